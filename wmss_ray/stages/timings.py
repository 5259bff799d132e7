"""Where a run's time went: per phase wall time, throughput, the Ray resources it asked for, and
the WMSS/SFT step-time ratio; in ``summary.json``, the HTML report and the console's final table.

Everything here is read back from what the phases already wrote (``manifest.json``: seconds and
counts; a training phase's ``metrics.jsonl``: ``tokens_per_s`` per logged step), so a skipped
phase keeps the figures of the run that made it, and nothing is measured twice.

Throughput, by phase kind:
- ``tokenize``: corpus rows read per second (``rows_in``); ``score_t``: rows scored per second
  (each row through the weak and the strong model); ``curriculum_t``: draws per second; ``eval``:
  rows per second over all models (``n`` x models).
- training phases (``sft``, ``wmss_t``, ``sft_continued``, the control arms): the median ``tokens_per_s`` of the
  logged steps (input tokens per second of the step itself, start-up excluded) and steps per
  second of the phase's wall time (start-up included).

The WMSS/SFT step-time ratio compares seconds per input token of a WMSS step with an SFT step's
(:func:`step_time_ratio`: medians over the logged steps, the first one left out as warm-up when
there are more): the step time at equal batch tokens. The SFT side is the equal-compute control
(``sft_continued``: same number of steps, same data size) when it ran, else ``sft``.

Resources are what the phase asks Ray for, from the config (:func:`phase_resources`): Train
workers x per-worker CPUs/GPUs, actor pools x per-actor CPUs/GPUs; the driver-only phases 1 CPU.

Layer: ``stages`` (imports ``config`` and ``io``).
"""

from __future__ import annotations

import html
import json
import math
import statistics
from typing import Any

from wmss_ray.config.names import CONTROL_ARM_LABELS, SFT_CONTINUED
from wmss_ray.io import storage
from wmss_ray.io.console import format_rate
from wmss_ray.io.files import read_metrics
from wmss_ray.io.manifest import read_manifest

SUMMARY_FILE = "summary.json"


def phase_kind(name: str) -> str:
    """``"train"``, ``"score"``, ``"curriculum"`` or the name itself (``wmss_2`` -> ``"train"``)."""
    if name in ("sft", SFT_CONTINUED, *CONTROL_ARM_LABELS) or name.startswith("wmss_"):
        return "train"
    return name.split("_", 1)[0] if name.startswith(("score_", "curriculum_")) else name


def phase_resources(name: str, cfg: dict[str, Any]) -> dict[str, float]:
    """The Ray resources phase ``name`` asks for, from the config dict (see the module doc)."""
    kind = phase_kind(name)
    sc, s, e, d = (cfg.get(k) or {} for k in ("scaling", "scoring", "evaluation", "data"))
    if kind == "train":
        n = int(sc.get("num_workers", 1))
        out = {"CPU": n * float(sc.get("cpus_per_worker", 1.0)), "GPU": n * float(sc.get("gpus_per_worker", 0.0))}
        pool = (cfg.get("mix") or {}).get("pool") or {}
        if name.startswith("wmss_") and (cfg.get("mix") or {}).get("placement") == "pool":
            actors = int(pool.get("replicas", 1)) * int(pool.get("shards", 1))
            out["GPU"] += actors * float(pool.get("gpus_per_actor", 0.0))
            out["CPU"] += actors * float(pool.get("cpus_per_actor", 1.0))
        return out
    if kind == "score":
        n = int(s.get("num_actors", 1))
        return {"CPU": n * float(s.get("cpus_per_actor", 1.0)), "GPU": n * float(s.get("gpus_per_actor", 0.0))}
    if kind == "eval":
        n = int(e.get("num_actors", 1))
        return {"CPU": n * float(e.get("cpus_per_actor", 1.0)), "GPU": n * float(e.get("gpus_per_actor", 0.0))}
    if kind == "tokenize":
        n = int(d.get("tokenize_actors", 1))
        return {"CPU": n * float(d.get("tokenize_cpus", 1.0)), "GPU": 0.0}
    return {"CPU": 1.0, "GPU": 0.0}  # data, phase0, curriculum, report: the driver process


def seconds_per_token(rows: list[dict[str, Any]]) -> float | None:
    """Median seconds per input token over logged steps (the first left out when there are more)."""
    tps = [float(m["tokens_per_s"]) for m in rows if _finite(m.get("tokens_per_s")) and m["tokens_per_s"] > 0]
    if len(tps) > 1:
        tps = tps[1:]  # the first step carries warm-up (allocations, the first all-reduce)
    return statistics.median(1.0 / t for t in tps) if tps else None


def step_time_ratio(wmss_rows: list[dict[str, Any]], sft_rows: list[dict[str, Any]]) -> float | None:
    """Seconds per input token of a WMSS step over an SFT step's (None without both)."""
    w, s = seconds_per_token(wmss_rows), seconds_per_token(sft_rows)
    return w / s if w is not None and s else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _rate(n: Any, seconds: float | None) -> float | None:
    return float(n) / seconds if _finite(n) and seconds else None


def phase_row(name: str, man: Any, cfg: dict[str, Any], metrics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One phase's figures from its manifest (``io.manifest.Manifest``) and training metrics."""
    secs = man.total_seconds if man is not None else None  # a resumed phase: its interrupted runs too
    counts = (man.counts if man is not None else None) or {}
    row: dict[str, Any] = {"phase": name, "status": man.status if man is not None else "missing",
                           "seconds": secs, "resources": phase_resources(name, cfg)}
    kind = phase_kind(name)
    if kind == "tokenize":
        row.update(rows=counts.get("rows_in"), unit="rows", rejected=counts.get("rows_rejected"))
    elif kind == "score":
        row.update(rows=counts.get("rows_scored"), unit="rows")
    elif kind == "curriculum":
        row.update(rows=counts.get("draws"), unit="draws")
    elif kind == "eval":
        models = ((man.outputs if man is not None else None) or {}).get("models") or {}
        row.update(rows=sum(int(m.get("n") or 0) for m in models.values()) or None, unit="rows")
    elif kind == "train":
        row.update(steps=counts.get("steps"), unit="steps", loss=counts.get("loss"))
        spt = seconds_per_token(metrics or [])
        row["tokens_per_s"] = 1.0 / spt if spt else None
    row["per_s"] = _rate(row.get("steps") if kind == "train" else row.get("rows"), secs)
    return row


def _metrics_of(run_dir: str, name: str, man: Any) -> list[dict[str, Any]]:
    path = ((man.outputs if man is not None else None) or {}).get("metrics") or storage.join(run_dir, name, "metrics.jsonl")
    try:
        return read_metrics(str(path)) if storage.exists(str(path)) else []
    except (OSError, ValueError):
        return []


def collect_timings(run_dir: str, phases: list[str], cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"phases": [row...], "total_seconds", "wmss_sft_step_ratio"}`` for ``phases`` of ``run_dir``."""
    rows, metrics = [], {}
    for name in phases:
        man = read_manifest(storage.join(run_dir, name))
        if phase_kind(name) == "train":
            metrics[name] = _metrics_of(run_dir, name, man)
        rows.append(phase_row(name, man, cfg, metrics.get(name)))
    wmss = [n for n in phases if n.startswith("wmss_")]
    base = SFT_CONTINUED if metrics.get(SFT_CONTINUED) else "sft"
    ratio = step_time_ratio(metrics.get(wmss[-1], []), metrics.get(base, [])) if wmss else None
    total = sum(r["seconds"] for r in rows if _finite(r["seconds"]))
    return {"phases": rows, "total_seconds": round(total, 2), "wmss_sft_step_ratio": ratio,
            "ratio_against": base if ratio is not None else None}


def _num(x: Any, spec: str) -> str:
    return format(x, spec) if _finite(x) else "-"


def _res(r: dict[str, float]) -> str:
    return f"{_num(r.get('CPU'), 'g')} CPU" + (f" {_num(r['GPU'], 'g')} GPU" if r.get("GPU") else "")


def table_rows(t: dict[str, Any]) -> list[list[str]]:
    """The timing table's cells: phase, status, seconds, throughput, resources, figure."""
    out = []
    for r in t["phases"]:
        thr = f"{format_rate(r.get('per_s'))} {r.get('unit', '')}/s" if r.get("per_s") else "-"
        if r.get("tokens_per_s"):
            thr += f", {format_rate(r['tokens_per_s'])} tok/s"
        fig = ""
        if r.get("loss") is not None:
            fig = f"loss {_num(r['loss'], '.4f')}"
        elif r.get("rejected"):
            fig = f"{r['rejected']} rejected"
        out.append([r["phase"], r["status"], _num(r["seconds"], ".1f"), thr, _res(r["resources"]), fig])
    return out


TABLE_HEADER = ["phase", "status", "seconds", "throughput", "resources", ""]


def ratio_line(t: dict[str, Any]) -> str:
    """One line on the WMSS/SFT step-time ratio, or an empty string without it."""
    if t.get("wmss_sft_step_ratio") is None:
        return ""
    return (f"WMSS/SFT step time: {t['wmss_sft_step_ratio']:.2f}x (seconds per input token, median over "
            f"logged steps, against {t['ratio_against']})")


def format_timings_table(t: dict[str, Any]) -> str:
    """The console's timing table (plain text, fixed-width columns)."""
    rows = [TABLE_HEADER] + table_rows(t)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"total {t['total_seconds']:.1f} s")
    if ratio_line(t):
        lines.append(ratio_line(t))
    return "\n".join(lines)


def timings_html(t: dict[str, Any] | None) -> str:
    """The report's "Phase timings" section body."""
    if not t or not t.get("phases"):
        return "<p class=missing>No phase timings (no phase manifests found).</p>"
    head = "".join(f"<th>{html.escape(h or 'figure')}</th>" for h in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(t))
    ratio = f"<p>{html.escape(ratio_line(t))}</p>" if ratio_line(t) else ""
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>total {t['total_seconds']:.1f} s of phase wall time (phases run in this or earlier "
            f"invocations; a skipped phase keeps its first run's time)</p>{ratio}")


def read_summary(run_dir: str) -> dict[str, Any] | None:
    """``<run_dir>/summary.json`` as written by :func:`write_summary`, or None when absent."""
    path = storage.join(run_dir, SUMMARY_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def write_summary(run_dir: str, timings: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    """Write ``<run_dir>/summary.json`` (timings + the eval table) and return its path."""
    path = storage.join(run_dir, SUMMARY_FILE)
    storage.write_text(path, json.dumps({"timings": timings, "results": results or {}}, indent=2, default=str))
    return path
