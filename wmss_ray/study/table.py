"""The study table: one row per arm and checkpoint (``final``, ``peak``) over the seeds, from the
seeds' records (``runner.seed_record``) and the per-problem outcomes they name. Plain code, no Ray.

Columns (docs/CONTROLS.md, "The study"):
- accuracy (greedy pass@1 on the test set): mean, std (ddof 1), min, max over seeds;
- the seed-level paired difference to WMSS at the same checkpoint kind: the mean of the per-seed
  differences with its 95 % t interval (the seeds are the sample);
- the sample-level paired bootstrap CI: per problem, the arm's correctness averaged over seeds
  minus WMSS's, resampled over problems (``study.n_boot`` resamples, seeded with ``run.seed``);
- sampled pass@1 (avg@k) and pass@k with ``evaluation.samples`` = k; completion NLL (nats per
  answer token), Brier score and ECE of the final-answer confidence: means over seeds;
- the costs (``study/costs.py``): means over seeds;
- for the peak rows, the selected steps; every row keeps each seed's run dir, phase and config hash.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.files import read_jsonl
from wmss_ray.stages.stats import mean_and_spread, mean_t_ci, paired_bootstrap_ci

CHECKPOINTS = ("final", "peak")
METRICS = ("loss", "avg_at_k", "pass_at_k", "brier", "ece")  # means over seeds besides accuracy
COSTS = ("updates", "supervised_tokens", "tokens", "flops", "seconds", "gpu_hours", "peak_rss_mb", "peak_gpu_mb")
CSV_COLUMNS = ("arm", "label", "checkpoint", "seeds", "accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max",
               "diff_vs_wmss", "diff_seed_ci_low", "diff_seed_ci_high", "diff_sample_ci_low", "diff_sample_ci_high",
               *METRICS, "peak_steps", *COSTS)


def _finite_mean(values: list[Any]) -> float | None:
    v = [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def correct_by_id(per_sample_path: str) -> dict[str, bool]:
    """``{sample_id: correct}`` of an ``eval_<model>.jsonl``."""
    return {str(r["sample_id"]): bool(r["correct"]) for r in read_jsonl(per_sample_path)}


def _per_problem_mean(outcomes: list[dict[str, bool]], ids: list[str]) -> np.ndarray:
    """Per problem in ``ids``, the share of ``outcomes`` (one dict per seed) that got it right. [n]"""
    return np.array([np.mean([o[i] for o in outcomes]) for i in ids], dtype=np.float64)


def sample_level_ci(arm: list[dict[str, bool]], wmss: list[dict[str, bool]], n_boot: int,
                    seed: int) -> tuple[float, float]:
    """The paired bootstrap CI of (arm - WMSS) accuracy over the problems every seed of both
    evaluated, each problem's outcome averaged over seeds."""
    ids = sorted(set.intersection(*(set(o) for o in arm + wmss))) if arm and wmss else []
    if not ids:
        return (float("nan"), float("nan"))
    return paired_bootstrap_ci(_per_problem_mean(arm, ids), _per_problem_mean(wmss, ids), n_boot=n_boot, seed=seed)


def pooled_reliability(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seeds' reliability bins (``eval_results.json``'s ``reliability``) pooled: per bin, the
    row-weighted mean confidence and accuracy over seeds."""
    pooled: dict[tuple[float, float], list[float]] = {}
    for e in entries:
        for b in (e or {}).get("reliability") or []:
            acc = pooled.setdefault((b["low"], b["high"]), [0.0, 0.0, 0.0])
            acc[0] += b["n"]
            acc[1] += b["n"] * b["confidence"]
            acc[2] += b["n"] * b["accuracy"]
    return [{"low": lo, "high": hi, "n": int(n), "confidence": c / n, "accuracy": a / n}
            for (lo, hi), (n, c, a) in sorted(pooled.items()) if n]


def arm_row(arm: str, checkpoint: str, records: list[dict[str, Any]], n_boot: int, seed: int,
            outcomes: dict[tuple[str, str, int], dict[str, bool]]) -> dict[str, Any]:
    """The table row of ``arm`` at ``checkpoint`` over the seeds' ``records``; ``outcomes``:
    ``(arm, checkpoint, seed) -> {sample_id: correct}``."""
    per_seed = [r["arms"][arm] for r in records]
    entries = [a[checkpoint] or {} for a in per_seed]
    acc = [float(e.get("accuracy", float("nan"))) for e in entries]
    mean, std, lo, hi = mean_and_spread(acc)
    row: dict[str, Any] = {"arm": arm, "label": per_seed[0]["label"], "checkpoint": checkpoint, "seeds": len(records),
                           "accuracy": acc, "accuracy_mean": mean, "accuracy_std": std, "accuracy_min": lo,
                           "accuracy_max": hi}
    if arm != "wmss":
        wmss_acc = [float((r["arms"]["wmss"][checkpoint] or {}).get("accuracy", float("nan"))) for r in records]
        diff, dlo, dhi = mean_t_ci([a - w for a, w in zip(acc, wmss_acc)])
        keys = [r["seed"] for r in records]
        slo, shi = sample_level_ci([outcomes[(arm, checkpoint, k)] for k in keys],
                                   [outcomes[("wmss", checkpoint, k)] for k in keys], n_boot, seed)
        row.update(diff_vs_wmss=diff, diff_seed_ci_low=dlo, diff_seed_ci_high=dhi, diff_sample_ci_low=slo,
                   diff_sample_ci_high=shi)
    for m in METRICS:
        row[m] = _finite_mean([e.get(m) for e in entries])
    row["reliability"] = pooled_reliability(entries)
    row["peak_steps"] = [a["peak_step"] for a in per_seed] if checkpoint == "peak" else [a["steps"] for a in per_seed]
    for c in COSTS:
        row[c] = _finite_mean([(a.get("costs") or {}).get(c) for a in per_seed])
    row["cells"] = [{"seed": r["seed"], "train_seed": r["train_seed"], "run_dir": a["run_dir"], "phase": a["phase"],
                     "config_hash": a["config_hash"], "per_sample_path": (a[checkpoint] or {}).get("per_sample_path"),
                     "model_dir": (a[checkpoint] or {}).get("model_dir")} for r, a in zip(records, per_seed)]
    return row


def study_table(base: WMSSConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"rows": [...], "seeds": [...], "k": samples, ...}`` for the seeds' ``records``."""
    arms = list(records[0]["arms"])
    outcomes = {}
    for r in records:
        for arm in arms:
            for cp in CHECKPOINTS:
                entry = r["arms"][arm][cp] or {}
                path = entry.get("per_sample_path")
                outcomes[(arm, cp, r["seed"])] = correct_by_id(path) if path else {}
    rows = [arm_row(arm, cp, records, base.study.n_boot, base.run.seed, outcomes) for cp in CHECKPOINTS for arm in arms]
    return {"rows": rows, "seeds": [{"seed": r["seed"], "train_seed": r["train_seed"], "run_dir": r["run_dir"]}
                                    for r in records],
            "k": base.evaluation.samples, "validate_every": base.study.validate_every, "n_boot": base.study.n_boot,
            "base_config_hash": base.config_hash(), "base_run_dir": storage.location(base.run_dir())}


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return "" if v is None else v


def write_table(root: str, table: dict[str, Any]) -> tuple[str, str]:
    """``<root>/study.json`` (everything) and ``<root>/study.csv`` (one line per row, :data:`CSV_COLUMNS`)."""
    js = storage.join(root, "study.json")
    storage.write_text(js, json.dumps(table, indent=2, allow_nan=True))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for row in table["rows"]:
        w.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
    path = storage.join(root, "study.csv")
    storage.write_text(path, buf.getvalue())
    return js, path


def summary_text(table: dict[str, Any]) -> str:
    """The console's study table: per arm and checkpoint, accuracy over seeds and the difference to
    WMSS with its seed-level CI (the page has every column)."""
    def pct(v: Any, spec: str = ".1f") -> str:
        return format(100 * v, spec) if isinstance(v, float) and math.isfinite(v) else "-"

    lines = [f"{'arm':<28} {'ckpt':<5} {'accuracy % (mean ± std)':<24} vs WMSS pp [95% CI over seeds]"]
    for r in table["rows"]:
        diff = "" if r["arm"] == "wmss" else (f"{pct(r.get('diff_vs_wmss'), '+.1f')} "
                                              f"[{pct(r.get('diff_seed_ci_low'), '+.1f')}, "
                                              f"{pct(r.get('diff_seed_ci_high'), '+.1f')}]")
        lines.append(f"{r['label']:<28} {r['checkpoint']:<5} "
                     f"{pct(r['accuracy_mean']) + ' ± ' + pct(r['accuracy_std']):<24} {diff}")
    return "\n".join(lines)
