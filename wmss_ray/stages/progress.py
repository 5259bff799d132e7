"""What the console says about each phase: its start line (what it will do, in numbers), how far
it is (a progress probe) and its end line (time, throughput, the figure that matters).

Pure functions of the config, the finished phases' manifests and the phase's own files; the
runner (``pipeline._run_one``) prints them through ``io.console`` and polls the probe from a
background thread (``io.console.monitor``).

Planned optimizer steps follow ``training.dataset.DataPlan``: ``ceil(rows x epochs / global
batch)`` capped by ``training.max_steps``; ``sft_continued`` and the control arms train the steps
that follow from the WMSS phases (``training.controls.arm_steps``), which the runner passes in
(``phases.Phase.planned_steps``). Progress for a training phase is the last step in its
``metrics.jsonl`` (rank 0 writes a line every ``training.log_every`` steps, and uploads it at once
on object storage); the other phases show their elapsed time only (their work runs inside Ray
Data, whose own bars go to the log).

Layer: ``stages`` (``config``, ``io``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from wmss_ray.config.names import CONTROL_ARM_LABELS, SFT_CONTINUED, SFT_CONTINUED_LABEL
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.console import format_duration, format_rate
from wmss_ray.io.manifest import read_manifest


def planned_steps(cfg: WMSSConfig, rows: int | None, epochs: float) -> int | None:
    """Optimizer steps of a training phase over ``rows`` rows (None when ``rows`` is unknown)."""
    if not rows:
        return None
    t = cfg.training
    batch = cfg.global_batch()
    steps = max(1, math.ceil(rows * epochs / batch - 1e-9))
    return min(steps, t.max_steps) if t.max_steps else steps


def _counts(run_dir: str, phase: str) -> dict[str, Any]:
    man = read_manifest(storage.join(run_dir, phase))
    return (man.counts or {}) if man is not None else {}


def phase_plan(name: str, cfg: WMSSConfig, run_dir: str, steps: int | None = None) -> tuple[str, int | None, str]:
    """``(what the phase will do, total units or None, unit)`` from the config and the
    manifests of the phases before it. ``steps``: a control's optimizer steps when the runner
    knows them (``phases.Phase.planned_steps``: they follow from the WMSS phases, which may live
    in another run dir, as for a sweep's shared control)."""
    d, k = cfg.data, cfg.run.iterations
    tok_rows = _counts(run_dir, "tokenize").get("rows_ok")
    if name == "data":
        return (f"demo corpus: {d.demo.n_train} train, {d.demo.n_validation} validation, "
                f"{d.demo.n_eval} eval rows", None, "")
    if name == "phase0":
        return f"pre-training M0 for {cfg.phase0.steps} steps", None, ""
    if name == "tokenize":
        src = f"{d.demo.n_train} demo rows" if cfg.models.demo else storage.redact(str(d.train))
        return f"reading and tokenising {src}", None, ""
    workers = f"{cfg.scaling.num_workers} worker{'s' if cfg.scaling.num_workers > 1 else ''}"
    if name == "sft":
        steps = planned_steps(cfg, tok_rows, cfg.training.sft_epochs)
        return f"SFT M0 -> M1 on {tok_rows} rows: {steps} steps, {workers}", steps, "steps"
    if name.startswith("score_"):
        t = int(name.split("_")[1])
        return (f"entropy of {tok_rows} rows under weak M{t - 1} and strong M{t}, "
                f"{cfg.scoring.num_actors} actor(s)", None, "")
    if name.startswith("curriculum_"):
        draws = round((tok_rows or 0) * cfg.curriculum.sample_multiplier)
        how = "uniform" if not cfg.curriculum.enabled else f"formula {cfg.curriculum.formula}"
        return f"drawing {draws} samples ({how})", None, ""
    if name.startswith("wmss_"):
        t = int(name.split("_")[1])
        draws = _counts(run_dir, f"curriculum_{t}").get("draws")
        steps = planned_steps(cfg, draws, cfg.training.wmss_epochs)
        return (f"WMSS M{t} -> M{t + 1} (lam {cfg.mix.lam}, {cfg.mix.mode}) on {draws} draws: "
                f"{steps} steps, {workers}", steps, "steps")
    if name == SFT_CONTINUED:
        if steps is None:
            steps = sum(int(_counts(run_dir, f"wmss_{t}").get("steps") or 0) for t in range(1, k + 1)) or None
        return f"{SFT_CONTINUED_LABEL} from M1 (equal compute): {_count(steps)} steps, {workers}", steps, "steps"
    if name in CONTROL_ARM_LABELS:
        return f"{CONTROL_ARM_LABELS[name]} from M1: {_count(steps)} steps, {workers}", steps, "steps"
    if name == "eval":
        n = d.demo.n_eval if cfg.models.demo else None
        rows = f"{n} test rows" if n else "the test set"
        return f"greedy answers + loss of every model on {rows}", None, ""
    return "", None, ""


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def training_probe(run_dir: str, name: str) -> Callable[[], int]:
    """The last step logged in ``<run_dir>/<name>/metrics.jsonl`` (0 before the first)."""
    path = storage.join(run_dir, name, "metrics.jsonl")

    def done() -> int:
        try:
            if not storage.exists(path):
                return 0
            lines = storage.read_text(path).strip().splitlines()
            return int(json.loads(lines[-1]).get("step") or 0) if lines else 0
        except (OSError, ValueError):  # mid-write, or a store that blinked: try again next time
            return 0

    return done


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"


def phase_result(name: str, counts: dict[str, Any], outputs: dict[str, Any], seconds: float) -> str:
    """The figure that matters at a phase's end, with its throughput."""
    rate = (lambda n: f", {format_rate(n / seconds)}/s" if isinstance(n, (int, float)) and seconds > 0 else "")
    if name == "tokenize":
        return (f"{counts.get('rows_ok')} rows kept, {counts.get('rows_rejected')} rejected, "
                f"{counts.get('rows_validation', 0)} to validation{rate(counts.get('rows_in'))}")
    if name.startswith("score_"):
        return f"{counts.get('rows_scored')} rows scored{rate(counts.get('rows_scored'))}"
    if name.startswith("curriculum_"):
        return (f"{counts.get('draws')} draws, effective sample size "
                f"{_fmt(counts.get('effective_sample_size'), '.1f')}")
    if name in ("sft", SFT_CONTINUED, *CONTROL_ARM_LABELS) or name.startswith("wmss_"):
        return f"{counts.get('steps')} steps, final loss {_fmt(counts.get('loss'), '.4f')}{rate(counts.get('steps'))}"
    if name == "eval":
        models = outputs.get("models") or {}
        return ", ".join(f"{m} {_fmt(r.get('accuracy'), '.3f')}" for m, r in models.items()) or "skipped"
    return ""  # report: the command's last lines name its path


def start_line(name: str, what: str) -> str:
    return f"[wmss] {name} started: {what}" if what else f"[wmss] {name} started"


def end_line(name: str, status: str, seconds: float, result: str) -> str:
    word = "done" if status == "completed" else status
    return f"[wmss] {name} {word} in {format_duration(seconds)}" + (f": {result}" if result else "")
