"""The study page, ``<run>/study/index.html``: the table (accuracy over seeds, paired differences
to WMSS, pass@k, calibration, costs) for the final checkpoints and the validation-selected peaks,
a forest plot of the differences to WMSS, the reliability diagrams, and where each cell comes
from (every seed's run dir, phase and config hash). PNGs embedded: the page is one file."""

from __future__ import annotations

import html
import math
import tempfile
from pathlib import Path
from typing import Any

from wmss_ray.io import storage
from wmss_ray.stages.report import PAGE_CSS, embedded_png, html_table
from wmss_ray.stages.report_plots import new_figure, save_png
from wmss_ray.study.table import CHECKPOINTS


def _f(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _pct_ci(d: Any, lo: Any, hi: Any) -> str:
    if d is None:
        return "-"
    return f"{_f(100 * d, '+.1f')} [{_f(100 * lo if lo is not None else None, '+.1f')}, " \
           f"{_f(100 * hi if hi is not None else None, '+.1f')}]"


def _big(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


HEADER = ["arm", "accuracy % mean ± std [min, max]", "vs WMSS, seeds (pp, 95% t CI)", "vs WMSS, problems (pp, bootstrap CI)",
          "pass@1 sampled", "pass@k", "NLL", "Brier", "ECE", "steps", "updates", "supervised tokens", "tokens",
          "FLOPs", "wall s", "GPU-h", "peak RSS MB", "peak GPU MB"]


def table_cells(row: dict[str, Any]) -> list[str]:
    """One row of the page's table (:data:`HEADER`)."""
    acc = (f"{_f(100 * row['accuracy_mean'], '.1f')} ± {_f(100 * row['accuracy_std'], '.1f')} "
           f"[{_f(100 * row['accuracy_min'], '.1f')}, {_f(100 * row['accuracy_max'], '.1f')}]")
    return [row["label"], acc, _pct_ci(row.get("diff_vs_wmss"), row.get("diff_seed_ci_low"), row.get("diff_seed_ci_high")),
            _pct_ci(row.get("diff_vs_wmss"), row.get("diff_sample_ci_low"), row.get("diff_sample_ci_high")),
            _f(row.get("avg_at_k")), _f(row.get("pass_at_k")), _f(row.get("loss"), ".4f"), _f(row.get("brier")),
            _f(row.get("ece")), " ".join(str(s) for s in row.get("peak_steps") or []), _big(row.get("updates")),
            _big(row.get("supervised_tokens")), _big(row.get("tokens")), _big(row.get("flops")),
            _f(row.get("seconds"), ".1f"), _f(row.get("gpu_hours"), ".3g"), _f(row.get("peak_rss_mb"), ".0f"),
            _f(row.get("peak_gpu_mb"), ".0f")]


def plot_forest(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Per arm and checkpoint, the difference to WMSS (pp) with its seed-level t CI (thick) and its
    problem-level bootstrap CI (thin)."""
    arms = [r for r in rows if r["arm"] != "wmss" and r.get("diff_vs_wmss") is not None]
    if not arms:
        return None
    fig = new_figure(7.0, 0.45 * len(arms) + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    for y, r in enumerate(reversed(arms)):
        d = 100 * r["diff_vs_wmss"]
        for lo, hi, width in ((r.get("diff_sample_ci_low"), r.get("diff_sample_ci_high"), 1.0),
                              (r.get("diff_seed_ci_low"), r.get("diff_seed_ci_high"), 4.0)):
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                ax.plot([100 * lo, 100 * hi], [y, y], color="tab:blue", linewidth=width, alpha=0.7)
        ax.plot([d], [y], "o", color="black")
    ax.axvline(0.0, color="grey", linestyle="--")
    ax.set_yticks(range(len(arms)))
    ax.set_yticklabels([f"{r['label']} ({r['checkpoint']})" for r in reversed(arms)])
    ax.set_xlabel("accuracy minus WMSS's (percentage points)")
    return save_png(fig, path)


def plot_reliability(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Reliability diagrams of the final checkpoints: accuracy per confidence bin (pooled over seeds)."""
    finals = [r for r in rows if r["checkpoint"] == "final" and r.get("reliability")]
    if not finals:
        return None
    fig = new_figure(6.4, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for r in finals:
        bins = r["reliability"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=r["label"])
    ax.set_xlabel("confidence (share of the k samples agreeing with the greedy answer)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def _cells_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        for c in r["cells"]:
            lines.append([r["label"], r["checkpoint"], c["seed"], c["train_seed"], c["run_dir"], c["phase"],
                          c["config_hash"], c.get("model_dir") or "-"])
    return html_table(["arm", "checkpoint", "seed", "train seed", "run dir", "phase", "config hash", "model"], lines)


def write_study_page(root: str, table: dict[str, Any]) -> str:
    """``<root>/index.html`` for the study ``table`` (``study.table.study_table``); returns its path."""
    rows = table["rows"]
    with tempfile.TemporaryDirectory(prefix="wmss-study-page-") as tmp:  # the PNGs, embedded, then gone
        out = Path(tmp)
        forest = plot_forest(rows, out / "forest.png")
        reliability = plot_reliability(rows, out / "reliability.png")
        parts = [f"<h1>WMSS study: {len(table['seeds'])} seeds</h1>",
                 f"<p>Base run {html.escape(str(table['base_run_dir']))} (config {table['base_config_hash']}); "
                 f"peaks validated every {table['validate_every']} steps; k = {table['k']} samples; "
                 f"{table['n_boot']} bootstrap resamples. Differences are each arm minus WMSS at the same "
                 "checkpoint kind, in percentage points.</p>"]
        for cp in CHECKPOINTS:
            title = "Final checkpoints" if cp == "final" else "Validation-selected peaks"
            parts.append(f"<h2>{title}</h2>")
            parts.append(html_table(HEADER, [table_cells(r) for r in rows if r["checkpoint"] == cp]))
        parts.append("<h2>Differences to WMSS</h2>" + (embedded_png(forest, "forest plot") or "<p>none</p>"))
        parts.append("<h2>Calibration (final checkpoints)</h2>"
                     + (embedded_png(reliability, "reliability diagrams")
                        or "<p>no sampled completions (evaluation.samples: 0)</p>"))
    parts.append("<h2>Where each cell comes from</h2>" + _cells_table(rows))
    page = storage.join(root, "index.html")
    storage.write_text(page, "<!doctype html><html><head><meta charset='utf-8'><title>WMSS study</title>"
                             f"<style>{PAGE_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return page
