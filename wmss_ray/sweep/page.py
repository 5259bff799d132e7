"""The sweep page: ``<run>/tune/page/index.html`` with its PNGs, from a finished sweep's files.

Reads, under ``root`` (= ``<run>/tune``):

- ``results.csv`` (required): one row per trial, ``trial,status,<param keys...>`` and the metric
  columns in :data:`FIXED`; every other column is a parameter (numeric when each non-empty cell
  parses as a number, else categorical);
- ``curves.csv`` (optional): one row per Tune report, ``trial,status,step,validation_accuracy,
  validation_loss,n_validation,final`` (intermediate reports are on a subsample);
- ``final.json`` (optional): the best configuration evaluated once on ``data.eval`` against
  SFT-continued, with the paired test.

Writes ``index.html`` (self-contained: the PNGs are embedded as base64 data URIs and also kept
beside it) and says on the page what is missing. Empty cells are NaN; a cell that is neither
empty nor of its column's type is an error naming the file, row and field.

CLI: ``python -m wmss_ray.sweep.page ROOT [--metric M] [--mode max|min]`` prints the page's path.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import html
import io
import json
import math
import os
import posixpath
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wmss_ray.config.names import SFT_CONTINUED, SFT_CONTINUED_LABEL
from wmss_ray.io import storage
from wmss_ray.stages import report_generation as gen
from wmss_ray.stages.report import PAGE_CSS, embedded_png, html_table, missing_note
from wmss_ray.sweep.page_plots import finite, plot_categories, plot_knobs, plot_learning_curves, plot_metric_vs_param
from wmss_ray.sweep.results import METRICS, PAIRED

FIXED = ("trial", "status", *METRICS, *PAIRED)  # results.csv's columns that are not parameters
STATUSES = ("completed", "stopped", "error", "pending")
CURVE_NUMBERS = ("step", "validation_accuracy", "validation_loss", "n_validation")


def _number(text: str, where: str) -> float:
    """A CSV cell as a float (empty -> NaN); anything else is an error naming ``where``."""
    text = text.strip()
    if not text or text.lower() in ("none", "null"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {text!r}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _csv_lines(path: str | Path) -> io.StringIO:
    """The text of a CSV file (a local path or a URI) to read with ``csv``."""
    return io.StringIO(storage.read_bytes(str(path)).decode("utf-8"), newline="")


def _read_csv(path: str | Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    reader = csv.DictReader(_csv_lines(path))
    missing = [k for k in required if k not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{storage.redact(str(path))}: header lacks column(s) {missing} (has {reader.fieldnames})")
    return [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]


def read_results(path: str | Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """``(rows, numeric param keys, categorical param keys)`` of a ``results.csv``.

    Each row: ``{"trial", "status", "params": {key: float | str | None}, <metric>: float}`` with
    NaN for empty metric cells and None for empty param cells.
    """
    raw = _read_csv(path, ("trial", "status"))
    keys = [k for k in (raw[0] if raw else {}) if k not in FIXED]
    if not raw:
        keys = [k for k in next(csv.reader(_csv_lines(path)), []) if k not in FIXED]
    numeric = [k for k in keys if all(_is_number(r[k]) for r in raw if r[k].strip())
               and any(r[k].strip() for r in raw)]
    rows = []
    for i, r in enumerate(raw, start=2):  # row 1 is the header
        status = r["status"].strip()
        if status not in STATUSES:
            raise ValueError(f"{path} row {i} field status: {status!r} is not one of {STATUSES}")
        row: dict[str, Any] = {"trial": r["trial"].strip(), "status": status, "params": {}}
        for k in FIXED[2:]:
            row[k] = _number(r.get(k, ""), f"{path} row {i} field {k}")
        for k in keys:
            v = r[k].strip()
            row["params"][k] = None if not v else float(v) if k in numeric else v
        rows.append(row)
    return rows, numeric, [k for k in keys if k not in numeric]


def read_curves(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{trial: [report, ...]}`` of a ``curves.csv``, each trial's reports sorted by step;
    a report: ``{"status", "step", "validation_accuracy", "validation_loss", "n_validation", "final"}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for i, r in enumerate(_read_csv(path, ("trial", "step")), start=2):
        point = {k: _number(r.get(k, ""), f"{path} row {i} field {k}") for k in CURVE_NUMBERS}
        final = (r.get("final") or "").strip().lower()
        if final not in ("", "true", "false", "1", "0"):
            raise ValueError(f"{path} row {i} field final: expected True/False, got {r['final']!r}")
        point.update(status=(r.get("status") or "").strip(), final=final in ("true", "1"))
        out.setdefault(r["trial"].strip(), []).append(point)
    for pts in out.values():
        pts.sort(key=lambda p: p["step"] if finite(p["step"]) else math.inf)
    return out


def rank_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """The rows best first: completed, then stopped, errored, pending; within a status by
    ``metric`` (``mode`` max: high first, min: low first), trials without a value last."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = -1.0 if mode == "max" else 1.0

    def key(r: dict[str, Any]) -> tuple:
        v = r.get(metric)
        return (STATUSES.index(r["status"]), 0 if finite(v) else 1, sign * v if finite(v) else 0.0)

    return sorted(rows, key=key)  # stable: ties keep the file's order


def _f(v: Any, spec: str = ".4f") -> str:
    return format(v, spec) if finite(v) else "-"


def _param(v: Any) -> str:
    return "-" if v is None else format(v, ".4g") if isinstance(v, float) else str(v)


def _diff_ci(d: Any, lo: Any, hi: Any) -> str:
    if not finite(d):
        return "-"
    ci = f" [{lo:+.4f}, {hi:+.4f}]" if finite(lo) and finite(hi) else ""
    return f"{d:+.4f}{ci}"


STATUS_LABEL = {"stopped": "stopped by ASHA", "error": "error", "pending": "pending", "completed": "completed"}


def _trial_table(ranked: list[dict], keys: list[str], metric: str) -> str:
    header = ["#", "trial", "status", *keys, "validation accuracy", "validation loss", "n", "step", "seeds",
              "accuracy std", f"diff vs {SFT_CONTINUED_LABEL} [95% CI]", "p (sign-flip; = McNemar for 1 seed)"]
    body = [[i + 1, r["trial"], STATUS_LABEL[r["status"]], *(_param(r["params"].get(k)) for k in keys),
             _f(r["validation_accuracy"]), _f(r["validation_loss"]), _f(r["n_validation"], ".0f"),
             _f(r["step"], ".0f"), _f(r["seeds"], ".0f"), _f(r["accuracy_std"]),
             _diff_ci(r["diff_vs_sft"], r["diff_ci_low"], r["diff_ci_high"]), _f(r["p_value"], ".3g")]
            for i, r in enumerate(ranked)]
    note = (f"<p class=meta>Best first by {html.escape(metric)}; completed trials first (their last "
            "report is the whole validation split), then those stopped by ASHA (last report on a subsample, "
            "never chosen as best), errored and pending ones. The diff is the trial's validation accuracy minus "
            f"{SFT_CONTINUED_LABEL}'s (one control run shared by all trials), paired over the validation rows.</p>")
    return html_table(header, body) + note


def _num(d: dict, k: str) -> Any:
    v = d.get(k)
    return v if finite(v) else None


def _final_section(final: dict | None, path: str) -> str:
    """The held-out (``data.eval``) result of the best configuration, or a line saying none is recorded."""
    if final is None:
        return missing_note(f"No final held-out evaluation is recorded ({path} not found).")
    es = final.get("eval_set") or {}
    parts = [f"<p>Best trial <b>{html.escape(str(final.get('trial', '?')))}</b>, params "
             + html.escape(", ".join(f"{k}={_param(v)}" for k, v in (final.get("params") or {}).items()) or "-")
             + f", evaluated once on {html.escape(str(es.get('name', 'test')))}"
             + (f" ({html.escape(str(es['source']))})" if es.get("source") else "")
             + (f", n = {html.escape(str(es['n']))}" if es.get("n") is not None else "") + ".</p>"]
    sft = final.get(SFT_CONTINUED) or {}
    k = int((final.get("sampling") or {}).get("samples") or 0)

    def cells(m: dict) -> list[str]:
        return [_f(_num(m, "accuracy")), _f(_num(m, "loss"))] + (
            [_f(_num(m, "avg_at_k")), _f(_num(m, "pass_at_k"))] if k else [])

    models = [[SFT_CONTINUED_LABEL, "-", *cells(sft)]] if sft else []
    models += [["WMSS", str(w.get("seed", "-")), *cells(w)] for w in final.get("wmss") or []]
    parts.append(html_table(["model", "seed", "held-out accuracy", "held-out loss"]
                            + ([f"avg@{k}", f"pass@{k}"] if k else []), models) if models
                 else missing_note(f"{path} has no {SFT_CONTINUED} / wmss results."))
    if final.get("engine"):
        parts.append(f"<p class=meta>{gen.engine_line({'final': final})}</p>")
    paired = final.get("paired") or []
    rows = [[f"{p.get('name_a', '?')} vs {p.get('name_b', '?')}", _f(_num(p, "n"), ".0f"),
             _f(_num(p, "acc_a")), _f(_num(p, "acc_b")),
             _diff_ci(_num(p, "diff"), _num(p, "ci_low"), _num(p, "ci_high")),
             _f(_num(p, "ci_level"), ".0%"), _f(_num(p, "p_value"), ".3g")] for p in paired if isinstance(p, dict)]
    parts.append(html_table(["pair", "n", "acc A", "acc B", "diff A - B [CI]", "CI level", "p (exact McNemar)"], rows)
                 if rows else missing_note(f"{path} has no paired test."))
    return "".join(parts)


def _run_name(root: str) -> str:
    """The run's name: the folder above ``<run>/tune``."""
    return posixpath.basename(posixpath.dirname(root.replace(os.sep, "/").rstrip("/")))


def _header(root: str, rows: list[dict], metric: str, mode: str) -> str:
    counts = Counter(r["status"] for r in rows)
    count_text = ", ".join(f"{counts.get(s, 0)} {STATUS_LABEL[s]}" for s in STATUSES)
    return (f"<h1>WMSS sweep: {html.escape(_run_name(root))}</h1>"
            f"<p class=meta>{html.escape(storage.redact(root))}</p>"
            f"<p>Metric <b>{html.escape(metric)}</b> ({'higher' if mode == 'max' else 'lower'} is better, "
            f"mode {html.escape(mode)}). {len(rows)} trials: {html.escape(count_text)}.</p>"
            "<p class=meta>Trials are compared on the validation split only; the test set (data.eval) is "
            "read once, for the final result of the chosen configuration.</p>")


def _read_final(path: str) -> dict | None:
    if not storage.exists(path):
        return None
    text, path = storage.read_text(path), storage.redact(path)  # the messages below show it redacted
    try:
        final = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(final, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(final).__name__}")
    for field in ("params", "eval_set", SFT_CONTINUED):
        if not isinstance(final.get(field) or {}, dict):
            raise ValueError(f"{path} field {field}: expected an object, got {final[field]!r}")
    for field in ("wmss", "paired"):
        items = final.get(field) or []
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise ValueError(f"{path} field {field}: expected a list of objects, got {items!r}")
    return final


@contextlib.contextmanager
def _page_dir(page: str) -> Iterator[Path]:
    """The local folder the page is drawn in: ``page`` itself, or on object storage a temporary
    folder uploaded to ``page`` (emptied first: no stale PNG) when the block ends without error."""
    if not storage.is_remote(page):
        local = Path(storage.resolve_fs(page)[1])
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="wmss-page-") as tmp:
        yield Path(tmp)
        storage.upload_dir(tmp, page)


def write_sweep_page(root: str | Path, metric: str = "validation_accuracy", mode: str = "max") -> Path | str:
    """Write ``root/page/index.html`` and its PNGs (``metric_vs_lam.png``, ``knobs.png``,
    ``learning_curves.png``, ``categories.png`` when there are string params) from the sweep
    files under ``root`` (= ``<run>/tune``, a local path or a URI); returns the HTML path (a
    ``Path``; a URI string on object storage). Only ``results.csv`` is required."""
    root = storage.location(str(root))
    results_csv = storage.join(root, "results.csv")
    if not storage.exists(results_csv):
        raise FileNotFoundError(f"{storage.redact(results_csv)} not found: no sweep results to page")
    if metric not in ("validation_accuracy", "validation_loss"):
        raise ValueError(f"metric must be validation_accuracy or validation_loss, got {metric!r}")
    rows, numeric, categorical = read_results(results_csv)
    ranked = rank_rows(rows, metric, mode)
    curves_csv, final_json = storage.join(root, "curves.csv"), storage.join(root, "final.json")
    curves = read_curves(curves_csv) if storage.exists(curves_csv) else None
    final = _read_final(final_json)
    page_dir = storage.join(root, "page")
    with _page_dir(page_dir) as out:
        _draw_page(out, root, rows, numeric, categorical, ranked, curves, final, metric, mode)
    return storage.join(page_dir, "index.html") if storage.is_remote(page_dir) else out / "index.html"


def _draw_page(out: Path, root: str, rows: list[dict], numeric: list[str], categorical: list[str],
               ranked: list[dict], curves: dict | None, final: dict | None, metric: str, mode: str) -> None:
    """The page's HTML and PNGs into the local folder ``out``."""
    results_csv, curves_csv = storage.redact(storage.join(root, "results.csv")), storage.redact(storage.join(root, "curves.csv"))
    final_json = storage.redact(storage.join(root, "final.json"))

    body = [_header(root, rows, metric, mode), "<h2>Final held-out result (test set, read once)</h2>",
            _final_section(final, final_json), "<h2>Trials (validation split)</h2>"]
    if not rows:
        body.append(missing_note(f"{results_csv} has no trials."))
    else:
        if not any(r["status"] == "completed" for r in rows):
            body.append(missing_note("No trial completed: nothing can be chosen as best."))
        if not any(finite(r[metric]) for r in rows):
            body.append(missing_note(f"No trial reported {metric} (the column is empty in {results_csv})."))
        body.append(_trial_table(ranked, numeric + categorical, metric))

    lam_png, lam = plot_metric_vs_param(rows, metric, numeric, out / "metric_vs_lam.png")
    body.append("<h2>Metric vs λ</h2>")
    if lam["x"] not in (None, "mix.lam"):
        body.append(missing_note(f"mix.lam is not a swept numeric parameter: plotted against {lam['x']}."))
    body.append(embedded_png(lam_png, f"{metric} vs {lam['x']}") + "<p class=meta>Filled circles: completed "
                "(whole validation split); crosses: stopped by ASHA (their last report, on a subsample); "
                "error bars: the spread over seeds where tune.seeds > 1.</p>" if lam_png else
                missing_note(f"Nothing to plot: no numeric parameter swept ({', '.join(numeric) or 'none'})"
                         f" with a reported {metric}."))
    knob_png, knobs = plot_knobs(rows, metric, numeric, out / "knobs.png")
    body.append("<h2>α / β / γ view</h2>")
    body.append(embedded_png(knob_png, "swept parameters") + "<p class=meta>Each point a trial "
                f"({html.escape(', '.join(knobs['keys']))}), coloured by {html.escape(metric)}.</p>" if knob_png else
                missing_note(f"No parameter view: no numeric parameter swept ({', '.join(numeric) or 'none'}) "
                         f"with a reported {metric}."))
    cat_png, _ = plot_categories(rows, metric, categorical, out / "categories.png")  # also clears a stale one
    if categorical:
        body.append("<h2>String parameters</h2>")
        body.append(embedded_png(cat_png, "metric by category") or missing_note(f"No {metric} to show by category."))
    body.append("<h2>Learning curves</h2>")
    if curves is None:
        body.append(missing_note(f"No learning curves ({curves_csv} not found)."))
    else:
        status = {t: pts[-1]["status"] for t, pts in curves.items()} | {r["trial"]: r["status"] for r in rows}
        curve_png, _ = plot_learning_curves(curves, status, out / "learning_curves.png")
        body.append(embedded_png(curve_png, "learning curves") + "<p class=meta>Intermediate reports are on a seeded "
                    "subsample of the validation split (tune.eval_samples rows); the diamond is a completed "
                    "trial's final report on the whole split. Dashed lines ending in x: stopped by ASHA.</p>"
                    if curve_png else missing_note(f"{curves_csv} has no reports with a metric."))
    page = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>WMSS sweep "
            f"{html.escape(_run_name(root))}</title><style>{PAGE_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    (out / "index.html").write_text(page, encoding="utf-8")


def main(argv: list[str] | None = None) -> Path | str:
    """``python -m wmss_ray.sweep.page ROOT [--metric M] [--mode max|min]``: write the page, print its path."""
    ap = argparse.ArgumentParser(prog="python -m wmss_ray.sweep.page", description="Write a sweep's HTML page.")
    ap.add_argument("root", help="the sweep's directory, <run>/tune")
    ap.add_argument("--metric", default="validation_accuracy", choices=("validation_accuracy", "validation_loss"))
    ap.add_argument("--mode", default="max", choices=("max", "min"))
    args = ap.parse_args(argv)
    path = write_sweep_page(args.root, args.metric, args.mode)
    print(path)
    return path


if __name__ == "__main__":
    main()
