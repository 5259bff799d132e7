"""The sweep page's figures (PNG, matplotlib's Agg canvas without pyplot, the run report's style).

Pure functions of the parsed sweep files (see :mod:`wmss_ray.sweep.page`): each takes the trial rows or the
curves and a path, and returns ``(path or None, drawn)``: ``None`` (and no file; a stale one is
removed) when there is nothing to draw, and ``drawn`` describes exactly what was plotted, so a
test can check the data and not only that a PNG exists.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wmss_ray.stages.report_plots import new_figure, save_png

KNOBS = ("mix.lam", "curriculum.alpha", "curriculum.beta", "curriculum.gamma")
MAX_DIMS = 5  # scatter-matrix size cap: beyond it the panels get too small to read
LEGEND_MAX = 12  # trials named in a legend; more get a colour map and a colour bar instead
MARKERS = {"completed": ("o", True), "stopped": ("x", True), "error": ("s", False), "pending": ("s", False)}


def finite(v: Any) -> bool:
    """True for an int/float that is not NaN/inf (bools and strings are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _done(path: Path, drawn: Any, fig=None) -> tuple[Path | None, Any]:
    if fig is None:
        path.unlink(missing_ok=True)  # no stale figure from an earlier render
        return None, drawn
    return save_png(fig, path), drawn


def x_param(rows: list[dict], numeric: list[str]) -> str | None:
    """The x axis of the metric plot: ``mix.lam`` when swept, else the first numeric param."""
    if "mix.lam" in numeric:
        return "mix.lam"
    order = [k for k in KNOBS if k in numeric] + [k for k in numeric if k not in KNOBS]
    return order[0] if order else None


def plot_metric_vs_param(rows: list[dict], metric: str, numeric: list[str],
                         path: Path) -> tuple[Path | None, dict]:
    """The metric vs ``mix.lam`` (or the first numeric param): one point per trial with a value.

    Completed trials filled circles, stopped ones crosses (their value is on a subsample), errored
    hollow squares; error bars ``accuracy_std`` where ``seeds > 1``. ``drawn``:
    ``{"x": key, "series": {status: [(trial, x, y, yerr), ...]}}``.
    """
    key = x_param(rows, numeric)
    series: dict[str, list[tuple]] = {}
    if key is None:
        return _done(path, {"x": None, "series": series})
    for r in rows:
        x, y = r["params"].get(key), r.get(metric)
        if finite(x) and finite(y):
            err = r.get("accuracy_std") if metric == "validation_accuracy" and (r.get("seeds") or 0) > 1 else None
            series.setdefault(r["status"], []).append((r["trial"], x, y, err if finite(err) else None))
    if not series:
        return _done(path, {"x": key, "series": series})
    fig = new_figure()
    ax = fig.add_subplot()
    for status, pts in series.items():
        marker, filled = MARKERS[status]
        label = {"stopped": "stopped by ASHA (subsample)"}.get(status, status)
        ax.errorbar([p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] or 0.0 for p in pts], fmt=marker,
                    ms=7, capsize=3, label=label, mfc=None if filled else "none")
    note = "" if key == "mix.lam" else " (mix.lam not swept)"
    ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}{note}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _done(path, {"x": key, "series": series}, fig)


def knob_keys(rows: list[dict], numeric: list[str]) -> list[str]:
    """The numeric params of the α/β/γ view: λ, α, β, γ when swept, else the other numeric ones."""
    varied = [k for k in numeric if any(finite(r["params"].get(k)) for r in rows)]
    keys = [k for k in KNOBS if k in varied] or varied
    return keys[:MAX_DIMS]


def plot_knobs(rows: list[dict], metric: str, numeric: list[str], path: Path) -> tuple[Path | None, dict]:
    """A scatter matrix of the swept numeric params (:func:`knob_keys`): below the diagonal each
    pair of params, one point per trial coloured by the metric (grey: no value); on the diagonal
    the metric over that param. One param: that single panel (a strip).
    ``drawn``: ``{"keys": [...], "points": [(trial, {key: value}, metric or None)]}``.
    """
    from matplotlib.colors import Normalize

    keys = knob_keys(rows, numeric)
    pts = [(r["trial"], {k: r["params"].get(k) for k in keys}, r.get(metric) if finite(r.get(metric)) else None)
           for r in rows if keys and all(finite(r["params"].get(k)) for k in keys)]
    drawn = {"keys": keys, "points": pts}
    c = np.array([np.nan if p[2] is None else p[2] for p in pts])
    grey = np.isnan(c)
    status = {r["trial"]: r.get("status") for r in rows}
    # a stopped trial's value is an earlier, subsample report: an x, not a dot like the finished ones
    done = np.array([status.get(p[0]) == "completed" for p in pts])
    n = len(keys)
    if not pts or grey.all():  # without a single metric value the view shows nothing
        return _done(path, drawn)
    norm = Normalize(np.nanmin(c), np.nanmax(c) + (0 if np.nanmax(c) > np.nanmin(c) else 1e-9))
    fig = new_figure(max(4.8, 2.3 * n + 1.2), max(3.2, 2.3 * n))
    if n > 1:  # fixed margins: tight/constrained layout of a grid with a shared colour bar takes seconds
        fig.set_layout_engine("none")
        fig.subplots_adjust(left=0.1, right=0.85, bottom=0.1, top=0.92, wspace=0.3, hspace=0.3)
    for i, ky in enumerate(keys):
        ys = np.array([p[1][ky] for p in pts], dtype=float)
        for j, kx in enumerate(keys[: i + 1]):  # the lower triangle and the diagonal only
            ax = fig.add_subplot(n, n, i * n + j + 1)
            xs = np.array([p[1][kx] for p in pts], dtype=float)
            y = c if i == j else ys
            if i != j:
                ax.scatter(xs[grey], ys[grey], c="lightgrey", s=18)
            for sel, marker in ((~grey & done, "o"), (~grey & ~done, "x")):
                if sel.any():
                    sc = ax.scatter(xs[sel], y[sel], c=c[sel], cmap="viridis", norm=norm, s=30, marker=marker)
            ax.grid(alpha=0.3)
            if i == n - 1:
                ax.set_xlabel(kx)
            if j == 0:
                ax.set_ylabel(metric if i == j else ky)
            elif i == j:
                ax.set_title(metric, fontsize="small")
    if n == 1:
        fig.colorbar(sc, ax=fig.axes[0], label=metric)
        fig.axes[0].set_title(f"the only numeric param: {keys[0]}", fontsize="medium")
    else:
        fig.colorbar(sc, cax=fig.add_axes((0.88, 0.1, 0.025, 0.82)), label=metric)
        fig.suptitle(f"Swept parameters, coloured by {metric} (x: stopped, its last subsample report; "
                     f"grey: no value; diagonal: {metric})")
    return _done(path, drawn, fig)


def plot_categories(rows: list[dict], metric: str, categorical: list[str],
                    path: Path) -> tuple[Path | None, dict]:
    """The metric by category of each string param (one strip panel per param).
    ``drawn``: ``{key: {category: [metric values]}}``."""
    drawn: dict[str, dict[str, list[float]]] = {}
    for k in categorical:
        by: dict[str, list[float]] = {}
        for r in rows:
            if finite(r.get(metric)) and r["params"].get(k) is not None:
                by.setdefault(str(r["params"][k]), []).append(r[metric])
        if by:
            drawn[k] = by
    if not drawn:
        return _done(path, drawn)
    fig = new_figure(max(4.0, 3.2 * len(drawn)), 3.6)
    for i, (k, by) in enumerate(drawn.items()):
        ax = fig.add_subplot(1, len(drawn), i + 1)
        for c, (cat, ys) in enumerate(sorted(by.items())):
            jitter = np.linspace(-0.15, 0.15, len(ys)) if len(ys) > 1 else np.zeros(1)
            ax.scatter(c + jitter, ys, s=20)
        ax.set_xticks(range(len(by)), [cat[:20] for cat in sorted(by)], rotation=30, ha="right")
        ax.set(title=k, ylabel=metric if i == 0 else None)
        ax.grid(alpha=0.3)
    return _done(path, drawn, fig)


def plot_learning_curves(curves: dict[str, list[dict]], status: dict[str, str],
                         path: Path) -> tuple[Path | None, list[dict]]:
    """Validation accuracy (and loss, when reported) vs step, one line per trial.

    Stopped trials dashed with an 'x' on their last report; the final whole-split report of a
    completed trial a black-edged diamond. Up to ``LEGEND_MAX`` trials are named in the legend,
    more are coloured by a colour map. ``drawn``: one ``{"trial", "status", "panel", "steps",
    "values", "linestyle", "end_marker"}`` per line.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.lines import Line2D

    panels = [k for k in ("validation_accuracy", "validation_loss")
              if any(finite(p.get(k)) for pts in curves.values() for p in pts)]
    drawn: list[dict] = []
    if not panels:
        return _done(path, drawn)
    trials = sorted(curves)
    many = len(trials) > LEGEND_MAX
    cmap = matplotlib.colormaps["viridis"]
    fig = new_figure(6.4 * len(panels), 4.4)
    if many:  # fixed margins leave room for the colour bar (tight layout cannot place a shared one)
        fig.set_layout_engine("none")
        fig.subplots_adjust(left=0.07, right=0.9, bottom=0.12, top=0.9, wspace=0.25)
    for i, key in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for t_i, trial in enumerate(trials):
            pts = [p for p in curves[trial] if finite(p.get(key)) and finite(p.get("step"))]
            if not pts:
                continue
            st = status.get(trial, "pending")
            colour = cmap(t_i / max(1, len(trials) - 1)) if many else f"C{t_i % 10}"
            style = "--" if st == "stopped" else "-"
            xs, ys = [p["step"] for p in pts], [p[key] for p in pts]
            ax.plot(xs, ys, style, color=colour, marker=".", label=None if many or i else trial)
            end = None
            if st == "stopped":
                end = "x"
                ax.plot(xs[-1:], ys[-1:], "x", color=colour, ms=9, mew=2)
            finals = [p for p in pts if p.get("final")]
            if finals:
                end = end or "D"
                ax.plot([p["step"] for p in finals], [p[key] for p in finals], "D", color=colour, ms=7, mec="k")
            drawn.append({"trial": trial, "status": st, "panel": key, "steps": xs, "values": ys,
                          "linestyle": style, "end_marker": end})
        ax.set(xlabel="WMSS optimizer step", ylabel=key, title=key.replace("_", " "))
        ax.grid(alpha=0.3)
        if i == 0:
            handles = [Line2D([], [], ls="--", marker="x", color="grey", label="stopped by ASHA"),
                       Line2D([], [], ls="", marker="D", color="grey", mec="k", label="final, whole validation split")]
            own = [] if many else ax.get_legend_handles_labels()[0]
            ax.legend(handles=own + handles, fontsize="small" if len(own) > 6 else None)
    if many:
        fig.colorbar(ScalarMappable(cmap=cmap), cax=fig.add_axes((0.92, 0.12, 0.015, 0.78)), ticks=[],
                     label=f"trial (colour by id order, {len(trials)} trials)")
    return _done(path, drawn, fig)
