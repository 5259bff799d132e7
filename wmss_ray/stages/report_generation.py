"""The report's generation parts: which engine and sampling settings produced each number, and the
sampled metrics (avg@k, pass@k) with their paired comparisons, when ``evaluation.samples`` >= 1.

Read from the eval phase's files (``eval_results.json``: each model's ``engine``, ``sampling``,
``avg_at_k``, ``pass_at_k``; ``eval_<name>.jsonl``: per problem ``sampled_correct``).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from wmss_ray.stages import stats


def has_sampled(models: dict[str, dict]) -> bool:
    return any(m.get("avg_at_k") is not None for m in models.values())


def sampled_k(models: dict[str, dict]) -> int:
    return max(int((m.get("sampling") or {}).get("samples") or 0) for m in models.values()) if models else 0


def paired_sampled_from_eval_dir(eval_dir: Path, models: dict[str, dict], pairs: tuple, config: dict) -> list[dict]:
    """:func:`~wmss_ray.stages.stats.paired_sampled` for each pair whose two models were sampled."""
    from wmss_ray.stages.evaluate import read_per_sample

    k = sampled_k(models)
    if not k:
        return []
    n_boot = (config.get("evaluation") or {}).get("paired_bootstrap", 10000)
    seed = (config.get("run") or {}).get("seed", 0)
    out = []
    for a, b in pairs:
        pa, pb = eval_dir / f"eval_{a}.jsonl", eval_dir / f"eval_{b}.jsonl"
        if (models.get(a) or {}).get("avg_at_k") is None or (models.get(b) or {}).get("avg_at_k") is None:
            continue
        if pa.exists() and pb.exists():
            out.append(stats.paired_sampled(read_per_sample(pa), read_per_sample(pb), k, a, b, n_boot=n_boot,
                                            seed=seed))
    return out


def engine_line(models: dict[str, dict]) -> str:
    """One sentence (HTML): the engine(s) and sampling settings behind the numbers."""
    engines = sorted({str(m.get("engine") or "hf") for m in models.values()})
    line = f"Generated with <b>{html.escape(', '.join(engines))}</b> (greedy"
    sampling = next((m.get("sampling") for m in models.values() if m.get("sampling")), None)
    if sampling:
        line += (f"; plus {sampling['samples']} sampled completions per problem at temperature "
                 f"{sampling['temperature']:g}, top-p {sampling['top_p']:g}, seed {sampling['seed']}")
    return line + ")."


def sampled_columns(m: dict[str, Any], fmt) -> list[str]:
    return [fmt(m.get(key), ".4f") for key in ("avg_at_k", "pass_at_k", "brier", "ece")]


def sampled_headers(k: int) -> list[str]:
    """avg@k, pass@k and the greedy answer's calibration (Brier, ECE: docs/EVALUATION.md)."""
    return [f"avg@{k}", f"pass@{k}", "Brier", "ECE"]


def paired_sampled_rows(pairs: list[dict]) -> list[list[Any]]:
    rows = []
    for p in pairs:
        for metric in ("avg_at_k", "pass_at_k"):
            d = p[metric]
            rows.append([f"{p['name_a']} vs {p['name_b']}", metric.replace("_at_k", f"@{p['k']}"), p["n"],
                         f"{d['diff']:+.4f}", f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"])
    return rows


def paired_sampled_lines(pairs: list[dict]) -> list[str]:
    """Console lines: ``WMSS vs M1 avg@4: +0.0500 [95% CI -0.02, +0.12], n=16``."""
    return [f"{name} {metric}: {diff} [{p['ci_level']:.0%} CI {ci[1:-1]}], n={n}"
            for p in pairs for name, metric, n, diff, ci in paired_sampled_rows([p])]
