"""What a sweep leaves behind: ``<run>/tune/results.csv`` (one row per trial: parameters,
metrics, the paired difference with the shared SFT-continued control, status),
``<run>/tune/curves.csv`` (every report of every trial: the learning curves) and
``<run>/tune/best.yaml`` (the base config with the best completed trial's values: ``wmss run
best.yaml`` runs it as is, into ``<run.name>-best``, whose phases up to scoring are links to the
sweep's (``io.manifest.link_phase``: symlinks, or ``<phase>.link`` references on object storage),
so only curriculum -> WMSS -> sft_continued -> eval -> report run).

A trial's status: ``completed`` (its last report is the whole validation split), ``stopped``
(ASHA ended it; its last report is an intermediate one on ``tune.eval_samples`` rows, so it is
never chosen as best), ``error``, or ``pending`` (no report yet).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import PurePosixPath
from typing import Any

from wmss_ray.config.loading import config_from_dict, save_config
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.sweep.trial import link_shared_phases

METRICS = ("validation_accuracy", "validation_loss", "n_validation", "step", "seeds", "accuracy_std")
PAIRED = ("diff_vs_sft", "diff_ci_low", "diff_ci_high", "p_value")  # wmss_ray/sweep/control.py fills them
CURVE_KEYS = ("validation_accuracy", "validation_loss", "n_validation", "final")


def _status(result) -> str:
    if result.error is not None:
        return "error"
    if not result.metrics:
        return "pending"
    return "completed" if result.metrics.get("final") else "stopped"


def _trial_name(result) -> str:
    return PurePosixPath(result.path).name if result.path else (result.metrics or {}).get("trial_id", "?")


def trial_rows(grid) -> list[dict[str, Any]]:
    """``[{trial, status, params, validation_accuracy, validation_loss, n_validation, step, seeds,
    accuracy_std}]``: one per trial, its last report."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": _trial_name(r), "status": _status(r), "params": dict(r.config or {}),
                     **{k: m.get(k) for k in METRICS}})
    return rows


def curve_rows(grid) -> list[dict[str, Any]]:
    """``[{trial, status, step, validation_accuracy, validation_loss, n_validation, final}]``: every
    report of every trial, in order (intermediate ones are on the ``tune.eval_samples`` subsample)."""
    out = []
    for r in grid:
        df = r.metrics_dataframe
        if df is None or "step" not in df:
            continue
        status = _status(r)
        for rec in df.to_dict("records"):
            out.append({"trial": _trial_name(r), "status": status, "step": rec.get("step"),
                        **{k: rec.get(k) for k in CURVE_KEYS}})
    return out


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


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO(newline="")
    w = csv.writer(out)
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue()


def write_outputs(base: WMSSConfig, rows: list[dict[str, Any]], curves: list[dict[str, Any]],
                  root: str) -> dict[str, Any] | None:
    """Write results.csv, curves.csv and (when a trial completed) best.yaml under ``root`` (a local
    path or a URI); returns the best row."""
    keys = sorted({k for r in rows for k in r["params"]})
    storage.write_text(storage.join(str(root), "results.csv"), _csv_text(
        ["trial", "status", *keys, *METRICS, *PAIRED],
        [[r["trial"], r["status"], *(r["params"].get(k) for k in keys), *(r.get(k) for k in (*METRICS, *PAIRED))]
         for r in rows]))
    storage.write_text(storage.join(str(root), "curves.csv"), _csv_text(
        ["trial", "status", "step", *CURVE_KEYS],
        [[c["trial"], c["status"], c["step"], *(c.get(k) for k in CURVE_KEYS)] for c in curves]))
    best = best_row(rows, base.tune.metric, base.tune.resolved_mode)
    if best is not None:
        cfg = best_config(base, best["params"])
        save_config(cfg, storage.join(str(root), "best.yaml"))
        # `wmss run best.yaml` then reruns nothing the sweep shares (same fingerprints): from the curriculum on
        link_shared_phases(base.run_dir(), cfg.run_dir())
    return best
