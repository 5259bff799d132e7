"""What a sweep leaves behind: ``<run>/tune/results.csv`` (one row per trial: parameters,
metrics, status) and ``<run>/tune/best.yaml`` (the base config with the best completed trial's
values: ``wmss run best.yaml`` runs it as is, into ``<run.name>-best``).

A trial's status: ``completed`` (its last report is the whole validation split), ``stopped``
(ASHA ended it; its last report is an intermediate one on ``tune.eval_samples`` rows, so it is
never chosen as best), ``error``, or ``pending`` (no report yet).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from wmss_ray.config import WMSSConfig
from wmss_ray.config_loading import config_from_dict, save_config

METRICS = ("validation_accuracy", "validation_loss", "n_validation", "step")


def _status(result) -> str:
    if result.error is not None:
        return "error"
    if not result.metrics:
        return "pending"
    return "completed" if result.metrics.get("final") else "stopped"


def trial_rows(grid) -> list[dict[str, Any]]:
    """``[{trial, status, params, validation_accuracy, validation_loss, n_validation, step}]``."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": Path(r.path).name if r.path else m.get("trial_id", "?"), "status": _status(r),
                     "params": dict(r.config or {}), **{k: m.get(k) for k in METRICS}})
    return rows


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best completed trial by ``metric`` (None when no trial completed)."""
    done = [r for r in rows if r["status"] == "completed" and isinstance(r.get(metric), (int, float))
            and not math.isnan(r[metric])]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r[metric])


def best_config(base: WMSSConfig, params: dict[str, Any]) -> WMSSConfig:
    """The base config with ``params``, in its own run directory ``<run.name>-best``."""
    overrides = [f"{k}={v}" for k, v in params.items()] + [f"run.name={base.run.name}-best"]
    return config_from_dict(base.to_dict(), overrides, source="tune best trial")


def write_outputs(base: WMSSConfig, grid, root: Path) -> dict[str, Any] | None:
    """Write results.csv and (when a trial completed) best.yaml under ``root``; returns the best row."""
    rows = trial_rows(grid)
    keys = sorted({k for r in rows for k in r["params"]})
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", *keys, *METRICS])
        for r in rows:
            w.writerow([r["trial"], r["status"], *(r["params"].get(k) for k in keys), *(r.get(k) for k in METRICS)])
    best = best_row(rows, base.tune.metric, base.tune.resolved_mode)
    if best is not None:
        save_config(best_config(base, best["params"]), root / "best.yaml")
    return best
