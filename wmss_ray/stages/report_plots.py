"""The run report's figures (PNG, matplotlib's Agg canvas without pyplot) and the weight histogram.

Pure functions of the run's data: each takes arrays or metric rows and a path and returns the
path written (or None when there is nothing to draw). Used by :mod:`wmss_ray.stages.report`;
``new_figure`` and ``save_png`` also by the sweep page's plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wmss_ray.config.names import SFT_CONTINUED, SFT_CONTINUED_LABEL

_MAX_SCATTER = 20000  # points; a subsample keeps the PNG small on million-row corpora


def new_figure(w: float = 6.4, h: float = 4.0):
    """A matplotlib Figure of ``w`` x ``h`` inches at 100 dpi, tight layout."""
    from matplotlib.figure import Figure

    # Figure + its Agg canvas directly: no pyplot, no global backend switch, thread-safe.
    return Figure(figsize=(w, h), dpi=100, layout="tight")


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG (no software stamp in its metadata); returns ``path``."""
    # Software=None: no URL in the PNG's metadata.
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for m in rows:
        v = m.get(key)
        if isinstance(v, (int, float)) and not math.isnan(v):
            xs.append(m.get("step", len(xs)))
            ys.append(v)
    return xs, ys


def plot_training_curves(metrics: dict[str, list[dict]], path: Path) -> Path | None:
    """Loss over steps for SFT-continued and WMSS, plus WMSS's ce_strong (strong alone)."""
    curves = [(SFT_CONTINUED, "loss", f"{SFT_CONTINUED_LABEL} loss", "-"), ("wmss", "loss", "WMSS loss (mixed)", "-"),
              ("wmss", "ce_strong", "WMSS CE of strong alone", "--")]
    fig = new_figure()
    series = [(metrics.get(phase) or [], key, label, style) for phase, key, label, style in curves]
    return _line_plot(fig, series, path, ylabel="answer-token CE (nats)", title="Training curves")


def _line_plot(fig, series: list[tuple[list[dict], str, str, str]], path: Path, ylabel: str,
               title: str) -> Path | None:
    """One line per (rows, key, label, style) over the optimizer step; None when nothing to draw."""
    ax = fig.add_subplot()
    drawn = 0
    for rows, key, label, style in series:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, label=label)
            drawn += 1
    if not drawn:
        return None
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_target_probs(metrics: dict[str, list[dict]], path: Path) -> Path | None:
    """Mean P_mix(y) and P_strong(y) of the target token over WMSS training."""
    rows = metrics.get("wmss") or []
    series = [(rows, "p_mix", "P_mix(y)", "-"), (rows, "p_strong", "P_strong(y)", "-")]
    return _line_plot(new_figure(), series, path, ylabel="mean target probability",
                      title="WMSS: target-token probability")


def plot_entropy_scatter(h_weak: np.ndarray, h_strong: np.ndarray, dh: np.ndarray, path: Path) -> Path:
    """Per-sample weak vs strong answer entropy, coloured by dH = H_strong - H_weak."""
    from matplotlib.colors import TwoSlopeNorm

    if len(dh) > _MAX_SCATTER:
        idx = np.random.default_rng(0).choice(len(dh), _MAX_SCATTER, replace=False)
        h_weak, h_strong, dh = h_weak[idx], h_strong[idx], dh[idx]
    fig = new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    lim = float(max(abs(dh.min()), abs(dh.max()), 1e-9))
    sc = ax.scatter(h_weak, h_strong, c=dh, cmap="coolwarm", norm=TwoSlopeNorm(0.0, -lim, lim), s=6, alpha=0.7)
    top = float(max(h_weak.max(), h_strong.max()))
    ax.plot([0, top], [0, top], "k:", lw=1, label="H_strong = H_weak")
    fig.colorbar(sc, ax=ax, label="dH = H_strong - H_weak")
    ax.set(xlabel="H_weak (nats/token)", ylabel="H_strong (nats/token)", title="Answer entropy per sample")
    ax.legend(loc="upper left")
    return save_png(fig, path)


WEIGHT_BINS = 50


def weight_histogram(weights: np.ndarray, draws: np.ndarray) -> dict[str, Any]:
    """The numbers behind the weight plot (also in ``report_data.json``): ``WEIGHT_BINS`` equal
    bins over ``[min, max]`` of the ``[N]`` weights, their sample counts, and
    ``core.curriculum.weight_summary`` of the weights and ``[N]`` draw counts."""
    from wmss_ray.stages.curriculum import weight_summary

    counts, edges = np.histogram(weights, bins=WEIGHT_BINS)
    return {"bin_edges": edges.tolist(), "counts": counts.tolist(), **weight_summary(weights, draws)}


def plot_weights_hist(hist: dict[str, Any], path: Path) -> Path:
    """Bar plot of a ``weight_histogram``."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.stairs(hist["counts"], hist["bin_edges"], fill=True, color="#4a7ab5")
    ax.set(xlabel="sampling weight p_i", ylabel="samples", title="Curriculum sampling weights")
    ax.set_yscale("log")
    return save_png(fig, path)


# ----------------------------------------------------------------------------- HTML
