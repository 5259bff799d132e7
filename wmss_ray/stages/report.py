"""The report of a run: a terminal table and a self-contained HTML page with plots.

``write_report`` reads whatever the run directory holds and says so where a part is missing, so a
half-finished run still gets a report. Plots are PNGs (matplotlib, Agg canvas, no pyplot global
state) written next to ``report.html`` and also embedded in it as base64 data URIs: the HTML alone
opens in a browser with no server and no network (inline CSS, no scripts).

The ``results`` dict (every key optional; missing ones are looked up under the run dir)::

    {
      "models": {name: {"accuracy": float, "loss": float, "n": int, "model_dir": str}},
                      # default: <eval_dir>/eval_results.json
      "checker": str, "eval_set": {name, source, n, max_samples, subsample_seed},
                      # default: the same file (which set the numbers come from, how checked)
      "counts": {"validation": int | None},    # rows of the validation split (selection only)
      "paired": PairedTest dict or a list of them (see wmss_ray.stages.stats.PairedTest.to_dict()),
                      # default: computed from <eval_dir>/eval_<name>.jsonl for
                      # WMSS vs SFT-continued (SFT_CONTINUED_LABEL) and WMSS vs M1
      "phases": {"sft_continued": metrics.jsonl path, "wmss": metrics.jsonl path},
                      # default: <run>/sft_continued/metrics.jsonl, the last <run>/wmss_<t>/metrics.jsonl
      "scores": scores.parquet path,           # default: the last <run>/score_<t>/scores.parquet
      "weights": weights.parquet path,         # the weights the curriculum phase drew from
                      # (sample_id, weight, draws); default: the last <run>/curriculum_<t>/weights.parquet
      "eval_dir": dir of the eval phase,       # default: <run>/eval
      "config": dict, "config_hash": str,      # default: <run>/config.yaml and its hash
    }
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wmss_ray.config.names import CONTROL_ARM_LABELS, SFT_CONTINUED, SFT_CONTINUED_LABEL
from wmss_ray.io.files import read_metrics
from wmss_ray.stages import report_generation as gen
from wmss_ray.stages import stats
from wmss_ray.stages.report_plots import (
    plot_entropy_scatter,
    plot_target_probs,
    plot_training_curves,
    plot_weights_hist,
    weight_histogram,
)
from wmss_ray.stages.timings import timings_html

log = logging.getLogger("wmss_ray.stages.report")

MODEL_ORDER = ("M0", "weak", "M1", SFT_CONTINUED_LABEL, *CONTROL_ARM_LABELS.values(), "WMSS")
PAIRS = (("WMSS", SFT_CONTINUED_LABEL), ("WMSS", "M1"), *(("WMSS", label) for label in CONTROL_ARM_LABELS.values()))


# ----------------------------------------------------------------------------- text table


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        width = re.match(r"\d*", spec).group()
        return "-".rjust(int(width or 0))  # keep the column width of the format spec
    return format(v, spec)


_RESULT_KEYS = {"models", "paired", "paired_sampled", "phases", "scores", "weights", "eval_dir", "config", "config_hash",
                "checker", "eval_set", "counts"}


def _model_entries(results: dict) -> dict[str, dict]:
    if not isinstance(results, dict):
        return {}
    models = (results.get("models") or {}) if set(results) & _RESULT_KEYS else results
    out = {}
    for name, m in (models or {}).items():
        if hasattr(m, "summary"):  # an evaluation.EvalResult
            m = m.summary()
        if isinstance(m, dict):
            out[name] = m
    order = [n for n in MODEL_ORDER if n in out] + sorted(n for n in out if n not in MODEL_ORDER)
    return {n: out[n] for n in order}


def _pairs(results: dict) -> list[dict]:
    p = results.get("paired") if isinstance(results, dict) else None
    if not p:
        return []
    return [p] if isinstance(p, dict) else list(p)


def paired_line(p: dict) -> str:
    """One line: ``WMSS vs SFT-continued: +0.020 [95% CI -0.010, +0.050], McNemar p=0.31, n=500``."""
    return (f"{p['name_a']} vs {p['name_b']}: {p['diff']:+.4f} "
            f"[{p['ci_level']:.0%} CI {p['ci_low']:+.4f}, {p['ci_high']:+.4f}], "
            f"McNemar p={p['p_value']:.3g} (only {p['name_a']} right: {p['only_a']}, "
            f"only {p['name_b']} right: {p['only_b']}), n={p['n']}")


def format_results_table(results: dict) -> str:
    """Fixed-width text table of held-out accuracy / loss / n per model, then paired tests.

    ``results``: ``{"models": {name: {...}}, "paired": ...}`` (module docstring) or directly
    ``{name: {...} | EvalResult}``.
    """
    models = _model_entries(results)
    if not models:
        return "(no evaluation results)"
    w = max(8, *(len(n) for n in models))
    k = gen.sampled_k(models) if gen.has_sampled(models) else 0
    extra = "".join(f"  {h:>8}" for h in gen.sampled_headers(k)) if k else ""
    lines = [f"{'model':<{w}}  {'accuracy':>8}  {'loss':>8}  {'n':>6}{extra}", "-" * (w + 30 + len(extra))]
    for name, m in models.items():
        lines.append(f"{name:<{w}}  {_fmt(m.get('accuracy'), '8.4f')}  {_fmt(m.get('loss'), '8.4f')}  "
                     f"{_fmt(m.get('n'), '6d')}" + ("".join(f"  {c:>8}" for c in gen.sampled_columns(m, _fmt))
                                                   if k else ""))
    lines += [paired_line(p) for p in _pairs(results)]
    lines += gen.paired_sampled_lines(results.get("paired_sampled") or []) if isinstance(results, dict) else []
    return "\n".join(lines)


# ----------------------------------------------------------------------------- collecting


def _last_numbered(run: Path, prefix: str, filename: str) -> str | None:
    found = []
    for d in run.glob(f"{prefix}_*"):
        m = re.fullmatch(rf"{prefix}_(\d+)", d.name)
        if m and (d / filename).exists():
            found.append((int(m.group(1)), d / filename))
    return str(max(found)[1]) if found else None


def _existing(path: Any) -> str | None:
    return str(path) if path and Path(path).exists() else None


def collect_results(run_dir: str | Path, results: dict | None = None) -> dict[str, Any]:
    """Fill the missing keys of ``results`` from the run directory (see the module docstring)."""
    run = Path(run_dir)
    r = dict(results or {})
    eval_dir = Path(r.get("eval_dir") or run / "eval")
    r["eval_dir"] = str(eval_dir)
    if (eval_dir / "eval_results.json").exists():
        saved = json.loads((eval_dir / "eval_results.json").read_text())
        for key in ("models", "checker", "eval_set"):
            if not r.get(key):
                r[key] = saved.get(key)
    phases = dict(r.get("phases") or {})
    defaults = {
        SFT_CONTINUED: _existing(run / SFT_CONTINUED / "metrics.jsonl"),
        "wmss": _last_numbered(run, "wmss", "metrics.jsonl"),
    }
    r["phases"] = {k: _existing(phases.get(k)) or v for k, v in defaults.items()}
    r["scores"] = _existing(r.get("scores")) or _last_numbered(run, "score", "scores.parquet")
    r["weights"] = _existing(r.get("weights")) or _last_numbered(run, "curriculum", "weights.parquet")
    if r.get("config") is None and (run / "config.yaml").exists():
        r["config"] = yaml.safe_load((run / "config.yaml").read_text())
    if r.get("config") is not None and not r.get("config_hash"):
        try:
            from wmss_ray.config.loading import config_from_dict

            r["config_hash"] = config_from_dict(r["config"]).config_hash()
        except Exception as err:  # a config from another version still gets a report
            log.warning("config hash not computable: %s", err)
    if not r.get("paired"):
        r["paired"] = _paired_from_eval_dir(eval_dir, r.get("config") or {})
    if not r.get("paired_sampled"):
        r["paired_sampled"] = gen.paired_sampled_from_eval_dir(eval_dir, _model_entries(r), PAIRS, r.get("config") or {})
    return r


def _paired_from_eval_dir(eval_dir: Path, config: dict) -> list[dict]:
    from wmss_ray.stages.evaluate import read_per_sample

    n_boot = (config.get("evaluation") or {}).get("paired_bootstrap", 10000)
    seed = (config.get("run") or {}).get("seed", 0)
    out = []
    for a, b in PAIRS:
        pa, pb = eval_dir / f"eval_{a}.jsonl", eval_dir / f"eval_{b}.jsonl"
        if pa.exists() and pb.exists():
            t = stats.paired_test_per_sample(read_per_sample(pa), read_per_sample(pb), a, b, n_boot=n_boot, seed=seed)
            out.append(t.to_dict())
    return out


# ----------------------------------------------------------------------------- plots


#: The stylesheet of the report page (and of the sweep page): inline, no network.
PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee}.missing{color:#8a5a00;background:#fff6e0;padding:.4rem .6rem}
pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.85rem}.meta{color:#666;font-size:.9rem}
"""


def embedded_png(path: Path | None, alt: str) -> str:
    """The PNG at ``path`` as an ``<img>`` with a base64 data URI ("" when ``path`` is None)."""
    if path is None:
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def missing_note(what: str) -> str:
    """A highlighted paragraph saying what a section lacks."""
    return f'<p class="missing">{html.escape(what)}</p>'


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table of ``header`` and ``rows`` (every cell escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _results_section(r: dict) -> str:
    models = _model_entries(r)
    if not models:
        return missing_note(f"No evaluation results (looked for {r['eval_dir']}/eval_results.json).")
    k = gen.sampled_k(models) if gen.has_sampled(models) else 0
    rows = [[n, _fmt(m.get("accuracy"), ".4f"), _fmt(m.get("loss"), ".4f"), _fmt(m.get("n"), "d")]
            + (gen.sampled_columns(m, _fmt) if k else []) for n, m in models.items()]
    return (html_table(["model", "held-out accuracy", "held-out loss (nats/token)", "n"]
                       + (gen.sampled_headers(k) if k else []), rows)
            + f"<p class=meta>{eval_set_line(r)} {gen.engine_line(models)}</p>"
            + "<p class=meta>Accuracy: greedy generation, final answer judged by the answer checker. "
              "Loss: teacher-forced cross-entropy over the supervised answer tokens, token-weighted "
              "mean.</p>")


def eval_set_line(r: dict) -> str:
    """Which set the held-out numbers come from, how it was subsampled and checked (HTML)."""
    es = r.get("eval_set") or {}
    checker = r.get("checker") or "unknown"
    name = es.get("name", "test")
    what = {"test": "the test set (data.eval, read only after training and every choice)",
            "validation": "the validation split"}.get(name, html.escape(str(name)))
    line = f"Numbers on {what}"
    if es.get("source"):
        line += f": {html.escape(str(es['source']))}"
    if es.get("n") is not None:
        line += f", {es['n']} problems"
    if es.get("max_samples") is not None:
        line += (f" (a seeded subsample of at most {es['max_samples']}, seed {es.get('subsample_seed')}, "
                 "chosen by a hash of sample_id)")
    line += f"; answer checker <b>{html.escape(str(checker))}</b>."
    n_val = (r.get("counts") or {}).get("validation")
    if n_val:
        line += f" The validation split ({n_val} rows, apart from training) is used only for selection (tune)."
    return line


def _paired_section(r: dict) -> str:
    pairs = _pairs(r)
    if not pairs:
        return missing_note(f"No paired comparison (needs per-sample results of WMSS and {SFT_CONTINUED_LABEL} or M1).")
    rows = [[f"{p['name_a']} vs {p['name_b']}", p["n"], f"{p['diff']:+.4f}",
             f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]", p["only_a"], p["only_b"], f"{p['p_value']:.3g}"]
            for p in pairs]
    return (html_table(["comparison", "n", "accuracy diff", f"{pairs[0]['ci_level']:.0%} bootstrap CI",
                    "only A right", "only B right", "McNemar p (exact)"], rows)
            + "<p class=meta>Paired per problem: exact McNemar test on the discordant problems; CI from a "
              "seeded paired bootstrap over problems.</p>"
            + (html_table(["comparison", "metric", "n", "diff", "95% bootstrap CI"],
                          gen.paired_sampled_rows(r["paired_sampled"])) if r.get("paired_sampled") else ""))


def _scores_section(scores: str | None, out: Path) -> str:
    if not scores:
        return missing_note("No scores.parquet found (entropy scoring has not run).")
    import pyarrow.parquet as pq

    table = pq.read_table(scores)
    cols = set(table.column_names)
    parts = []
    if {"h_weak", "h_strong"} <= cols and table.num_rows:
        hw = table.column("h_weak").to_numpy(zero_copy_only=False).astype(np.float64)
        hs = table.column("h_strong").to_numpy(zero_copy_only=False).astype(np.float64)
        dh = table.column("dh").to_numpy(zero_copy_only=False).astype(np.float64) if "dh" in cols else hs - hw
        parts.append(html_table(["samples", "mean H_weak", "mean H_strong", "share dH < 0"],
                            [[len(dh), f"{hw.mean():.4f}", f"{hs.mean():.4f}", f"{(dh < 0).mean():.3f}"]]))
        parts.append(embedded_png(plot_entropy_scatter(hw, hs, dh, out / "entropy_scatter.png"), "entropy scatter"))
    else:
        parts.append(missing_note(f"{scores} has no h_weak/h_strong rows."))
    return "".join(parts)


def _read_weights(weights: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(weight [N] float64, draws [N] int64)`` of a curriculum ``weights.parquet``, else None."""
    if not weights:
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(weights)
    if not {"weight", "draws"} <= set(table.column_names) or not table.num_rows:
        return None
    return (table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64),
            table.column("draws").to_numpy(zero_copy_only=False).astype(np.int64))


def _weights_section(hist: dict[str, Any] | None, weights: str | None, out: Path) -> str:
    if hist is None:
        return missing_note(f"No curriculum weights ({weights or 'curriculum_<t>/weights.parquet'} not found "
                        "or empty; the curriculum phase has not run).")
    line = (f"Effective sample size (Σw)²/Σw²: {hist['effective_sample_size']:.1f} of {sum(hist['counts'])}; "
            f"{hist['draws']} draws reached {hist['samples_drawn']} samples, at most "
            f"{hist['max_draws_per_sample']} draws of one sample")
    return (f"<p class=meta>{html.escape(line)}. These are the weights the curriculum phase drew "
            "from.</p>" + embedded_png(plot_weights_hist(hist, out / "weights_hist.png"), "sampling weights"))


def _pool_section(rows: list[dict]) -> str:
    """The weak pool's top-k truncation over the WMSS steps (``mix.placement: pool`` only)."""
    rows = [m for m in rows if "trunc_bound" in m]
    if not rows:
        return ""
    sampled = [m for m in rows if m.get("n_sampled")]

    def worst(key, among):
        vals = [m[key] for m in among if m.get(key) is not None]
        return f"{max(vals):.3g}" if vals else "n/a"

    cells = [("logged steps", str(len(rows))),
             ("weak tail mass (mean over steps / max)",
              f"{sum(m['weak_tail_mass_mean'] for m in rows) / len(rows):.3g} / {worst('weak_tail_mass_max', rows)}"),
             ("loss error bound, nats/token (max over steps)", worst("trunc_bound", rows)),
             ("measured error on sampled positions vs its bound (mean per token, worst step)",
              f"{worst('trunc_error_sampled_mean', sampled)} vs {worst('trunc_bound_sampled_mean', sampled)}"),
             ("reply bytes per answer token", worst("pool_reply_bytes_per_token", rows)),
             ("steps over mix.pool.error_warn", str(sum(bool(m.get("trunc_warning")) for m in rows)))]
    trs = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in cells)
    return f"<h2>Weak pool: top-k truncation</h2><table>{trs}</table>"


def write_report(run_dir: str | Path, results: dict | None = None, out_path: str | Path | None = None) -> Path:
    """Write ``report.html`` (default ``<run_dir>/report/report.html``) with PNGs beside it.

    Also writes ``report_data.json`` there (the collected results, for scripts). Returns the HTML
    path. Never fails on a missing part: its section says what is missing.
    """
    r = collect_results(run_dir, results)
    out_file = Path(out_path) if out_path else Path(run_dir) / "report" / "report.html"
    out = out_file.parent
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: read_metrics(str(p)) for k, p in r["phases"].items() if p}

    curves = plot_training_curves(metrics, out / "training_curves.png")
    read = _read_weights(r.get("weights"))
    hist = weight_histogram(*read) if read is not None else None
    probs = plot_target_probs(metrics, out / "target_probs.png")
    cfg_text = yaml.safe_dump(r["config"], sort_keys=False) if r.get("config") is not None else None
    run_name = ((r.get("config") or {}).get("run") or {}).get("name") or Path(run_dir).name
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>WMSS run report: {html.escape(str(run_name))}</h1>",
        f"<p class=meta>run dir {html.escape(str(r.get('run_dir') or Path(run_dir).resolve()))} · config hash "
        f"{html.escape(r.get('config_hash') or 'unknown')} · generated {stamp}</p>",
        "<h2>Held-out results (test set)</h2>", _results_section(r),
        "<h2>Paired test</h2>", _paired_section(r),
        "<h2>Training curves</h2>",
        embedded_png(curves, "training curves")
        or missing_note(f"No training metrics ({SFT_CONTINUED} / wmss metrics.jsonl not found)."),
        "<h2>Target-token probability during WMSS</h2>",
        embedded_png(probs, "P_mix and P_strong") or missing_note("No WMSS metrics with p_mix / p_strong."),
        _pool_section(metrics.get("wmss") or []),
        "<h2>Phase timings</h2>", timings_html(r.get("timings")),
        "<h2>Weak vs strong entropy</h2>", _scores_section(r.get("scores"), out),
        "<h2>Sampling weights</h2>", _weights_section(hist, r.get("weights"), out),
        "<h2>Config</h2>",
        f"<pre>{html.escape(cfg_text)}</pre>" if cfg_text else missing_note("No config found (config.yaml)."),
    ]
    page = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>WMSS report "
            f"{html.escape(str(run_name))}</title><style>{PAGE_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    out_file.write_text(page, encoding="utf-8")
    data = {k: r.get(k) for k in ("models", "checker", "eval_set", "counts", "paired", "paired_sampled", "phases",
                                  "scores", "weights", "config_hash", "timings")}
    data["weight_histogram"] = hist
    (out / "report_data.json").write_text(json.dumps(data, indent=2, default=str))
    return out_file
