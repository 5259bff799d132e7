"""The WMSS pipeline's runner: the phases (``wmss_ray/phases.py``) in order, each resumable, all
under one run directory.

Each phase writes ``<run_dir>/<phase>/manifest.json`` (see ``manifest.py``). The run dir is a
local path or an object-storage URI (``run.storage: s3://bucket/runs``): every output goes
through ``storage``, and a store that cannot be reached fails before the first phase. A re-run skips every
phase that completed with the same fingerprint; ``from_phase`` reruns from a phase on; a crashed
phase (status ``running``/``failed``) of the same fingerprint runs again, and training phases
resume from their last Ray Train checkpoint. A phase that runs with other inputs, or is forced,
starts from an empty directory (``manifest.prepare_phase_dir``): a checkpoint resumes only the
run that wrote it, and a training phase checks at its end that every step of its plan was
trained by runs of its fingerprint. :func:`run_phases` is that runner for any list of phases:
``wmss run``, each seed of a tune trial (through :func:`run_pipeline`) and the sweep's shared
control (``wmss_ray/sweep/control.py``, a :class:`Phase` under ``<run>/tune``) all use it.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from wmss_ray.cluster import ensure_ray
from wmss_ray.config.loading import check_corpus_paths, check_model_dirs, check_tokenizer_dir, save_config
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.console import get_console, monitor
from wmss_ray.io.manifest import (Manifest, interrupted_seconds, layout_of, linked_phase, now, prepare_phase_dir,
                                  read_manifest, with_layout)
from wmss_ray.phases import Phase, RunContext, build_phases, write_run_summary
from wmss_ray.stages import progress

log = logging.getLogger("wmss_ray.pipeline")


# ----------------------------------------------------------------------------- runner


def _phase_fingerprint(phase: Phase, cfg_dict: dict[str, Any], prints: dict[str, str]) -> str:
    return phase.fingerprint(cfg_dict, prints)


def resumed_fingerprint(phase: Phase, cfg: WMSSConfig, cfg_dict: dict[str, Any], prints: dict[str, str],
                        old: Manifest | None) -> tuple[str, dict[str, Any] | None]:
    """``(fingerprint, layout)`` of ``phase`` under this config, given its directory's manifest.

    Normally the fingerprint of the config as it is, with the values of the phase's layout keys
    (``Phase.layout``). But when only those keys changed since the manifest's run, at the same
    global batch (4 workers x grad-accum 1 -> 2 x 2, ZeRO 2 -> 3, colocated -> pool), it is that
    run's fingerprint and layout: the phase resumes (or stays completed) instead of starting over,
    and every later phase keeps its fingerprint. Why not leave the layout keys out of the hash:
    every run made before would change fingerprint and retrain after the upgrade.
    """
    fp = _phase_fingerprint(phase, cfg_dict, prints)
    layout = layout_of(cfg_dict, phase.layout) if phase.layout else None
    if old is None or old.fingerprint == fp or not phase.layout or old.layout is None:
        return fp, layout
    then = with_layout(cfg_dict, phase.layout, old.layout)
    if _phase_fingerprint(phase, then, prints) != old.fingerprint:
        return fp, layout  # something else changed too
    try:
        same_batch = WMSSConfig.model_validate(then).global_batch() == cfg.global_batch()
    except ValueError:  # that layout does not validate with this config
        same_batch = False
    if not same_batch:
        return fp, layout
    changed = {k: (old.layout.get(k), layout.get(k)) for k in phase.layout if old.layout.get(k) != layout.get(k)}
    log.info("phase %-13s continues its run at another layout: %s", phase.name, changed)
    return old.fingerprint, old.layout


def run_pipeline(cfg: WMSSConfig, from_phase: str | None = None, until: str | None = None,
                 train_options: dict[str, dict[str, Any]] | None = None,
                 only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run every phase in order (skipping completed ones); returns each phase's outputs.

    ``from_phase`` forces that phase and all later ones to run again; ``until`` stops after it.
    ``train_options``: ``{"wmss_<t>": {...}}`` extra ``train_phase`` arguments that leave the
    phase's result as it is (``validation``, ``callbacks``: a tune trial's reports; ``stop_after``,
    ``export_at_stop``: a chunk of it, after which the phase is ``stopped`` and the run ends there;
    the next call resumes it). ``only``: run just these phases; every phase before the last of
    them must have completed with its fingerprint already (read, never run: a study runs a seed's
    arms side by side, each its own phase of one run dir); the others are not touched.
    """
    phases = build_phases(cfg)
    check_phase_names(phases, from_phase, until)
    ctx = RunContext(cfg, train_options)
    preflight(cfg)
    if cfg.training.lora.enabled:  # a user's models.strong with another tokenizer: named before any phase
        from wmss_ray.training.trainer import check_lora_strong

        check_lora_strong(cfg)
    storage.check_reachable(ctx.run_dir)  # an unreachable store fails here, naming the URI
    if only is None:  # run-level files: phases run side by side (only) leave them to the whole run
        save_config(cfg, storage.join(ctx.run_dir, "config.yaml"))
    outputs = run_phases(ctx, phases, from_phase, until, only)
    if only is None:
        write_run_summary(ctx)  # <run>/summary.json: the console's final table reads it back
    return outputs


def preflight(cfg: WMSSConfig) -> None:
    """What the user got wrong, found before Ray starts: a missing model directory, a model
    directory without its tokenizer, a missing or unreadable corpus (``ConfigError``: one line
    naming the key)."""
    check_model_dirs(cfg)
    check_tokenizer_dir(cfg)
    check_corpus_paths(cfg)


def check_phase_names(phases: list[Phase], *names: str | None) -> None:
    """Refuse a ``from_phase`` / ``until`` that is not one of ``phases``, naming those there are."""
    known = [p.name for p in phases]
    for arg in names:
        if arg is not None and arg not in known:
            raise ValueError(f"unknown phase '{arg}'; phases of this config: {', '.join(known)}")


def run_phases(ctx: RunContext, phases: list[Phase], from_phase: str | None = None,
               until: str | None = None, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The one resumable runner: run ``phases`` in order, each in ``<ctx.run_dir>/<phase>/``.

    A phase completed with the same fingerprint is skipped (its outputs reused); an unfinished one
    (``running``/``failed``/``stopped``) of the same fingerprint resumes from what its directory
    holds; any other, or one forced by ``from_phase`` (and every later one), runs from an emptied
    directory (``manifest.prepare_phase_dir``). A linked phase directory is never rerun. The run
    ends after ``until``, or at a phase that ends ``stopped``. Phases run elsewhere may be given in
    ``ctx.outputs`` and ``ctx.fingerprints`` (the sweep's control reads the base run's SFT this
    way). ``only``: see :func:`run_pipeline`. Returns ``ctx.outputs``.
    """
    check_phase_names(phases, from_phase, until, *(only or ()))
    cfg_dict = ctx.cfg.fingerprint_dict()  # keys added since a run was made hash only when set
    forced = False
    needed = upstream_phases(phases, only) if only else None
    for phase in phases:
        if needed is not None and phase.name not in needed:
            continue  # neither selected nor upstream of a selected phase (another arm): not touched
        forced = forced or phase.name == from_phase
        phase_dir = ctx.phase_dir(phase.name)
        old = read_manifest(phase_dir)
        fp, layout = resumed_fingerprint(phase, ctx.cfg, cfg_dict, ctx.fingerprints, old)
        ctx.fingerprints[phase.name] = fp
        done = old is not None and old.status == "completed" and old.fingerprint == fp
        if only is not None and phase.name not in only:
            if not done:
                raise RuntimeError(f"phase {phase.name} of {storage.redact(ctx.run_dir)} has not completed with "
                                   f"these inputs; it must before {', '.join(only)} can run on their own")
            ctx.outputs[phase.name] = old.outputs
            continue
        if not forced and done:
            log.info("phase %-13s skipped (completed, same inputs)", phase.name)
            get_console().line(f"[wmss] {phase.name} skipped: completed before with the same inputs")
            ctx.outputs[phase.name] = old.outputs
        elif (target := linked_phase(storage.join(ctx.run_dir, phase.name))) is not None:
            # Linked from another run (a tune trial or an ablation; a symlink, or a reference file
            # on object storage): never rerun it in place, that would overwrite the other run's results.
            done = old is not None and old.status == "completed"
            why = "was forced" if forced else "has other inputs here" if done else "did not complete there"
            raise RuntimeError(f"phase {phase.name} is linked from {storage.redact(target)} and {why}; "
                               f"refusing to overwrite it (remove the link to run it in this run dir)")
        elif _run_one(phase, ctx, fp, phase_dir, forced, old, layout) != "completed":
            break  # stopped short of its end on purpose: later phases need what it did not make yet
        if phase.name == until:
            break
    return ctx.outputs


def completed_elsewhere(cfg: WMSSConfig, run_dir: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (phases of ``cfg``, in pipeline order) completed in another run's
    ``run_dir`` with the fingerprints ``cfg`` gives them: those a run of ``cfg`` may link instead
    of training again (a study's seed 0 and ``wmss run``'s run share SFT, scores and curriculum).
    Fingerprints are computed as :func:`run_phases` does, each phase hashing its upstream ones'
    as found in ``run_dir``; the answer stops at the first phase of ``names`` that does not match,
    since every later phase's inputs differ then."""
    wanted, out = set(names), []
    cfg_dict, prints = cfg.fingerprint_dict(), {}
    for phase in build_phases(cfg):
        if not wanted:
            break
        old = read_manifest(storage.join(run_dir, phase.name))
        prints[phase.name], _ = resumed_fingerprint(phase, cfg, cfg_dict, prints, old)
        if phase.name in wanted:
            if old is None or old.status != "completed" or old.fingerprint != prints[phase.name]:
                break
            out.append(phase.name)
            wanted.discard(phase.name)
    return out


def upstream_phases(phases: list[Phase], names: tuple[str, ...]) -> set[str]:
    """``names`` and every phase they need, directly or not."""
    by_name = {p.name: p for p in phases}
    out, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(by_name[n].needs)
    return out


def _run_one(phase: Phase, ctx: RunContext, fp: str, phase_dir: str, forced: bool, old: Manifest | None,
             layout: dict[str, Any] | None = None) -> str:
    """Run one phase (resuming an interrupted run of the same fingerprint: ``old``, the manifest in
    ``phase_dir`` before this run); returns its status."""
    if phase.name not in ("data", "phase0", "report"):
        ensure_ray()
    resumed = prepare_phase_dir(phase_dir, phase.name, fp, forced)  # another run's leftovers are deleted here
    earlier = interrupted_seconds(old, phase_dir) if resumed and old is not None else 0.0  # it resumes their work
    inputs = {n: ctx.outputs.get(n) for n in phase.needs}
    man = Manifest(phase=phase.name, status="running", fingerprint=fp, config_hash=ctx.cfg.config_hash(),
                   inputs=inputs, started_at=now(), layout=layout, earlier_seconds=earlier)
    man.write(phase_dir)
    log.info("phase %-13s running", phase.name)
    console = get_console()
    steps = _planned_steps(phase, ctx)
    what, total, unit = progress.phase_plan(phase.name, ctx.cfg, ctx.run_dir, steps)
    console.line(progress.start_line(phase.name, what))
    probe = progress.training_probe(ctx.run_dir, phase.name) if unit == "steps" else None
    try:
        with monitor(console, phase.name, total, unit, probe):
            result = phase.run(ctx)
    except BaseException as err:
        man.status, man.error = "failed", "".join(traceback.format_exception_only(type(err), err)).strip()
        man.finished_at = now()
        man.write(phase_dir)
        raise
    man.outputs, man.counts = result.get("outputs", {}), result.get("counts", {})
    man.status, man.finished_at = result.get("status", "completed"), now()
    man.seconds = round(man.finished_at - man.started_at, 2)
    man.write(phase_dir)
    ctx.outputs[phase.name] = man.outputs
    console.line(progress.end_line(phase.name, man.status, man.seconds,
                                   progress.phase_result(phase.name, man.counts, man.outputs, man.seconds)))
    return man.status


def _planned_steps(phase: Phase, ctx: RunContext) -> int | None:
    """A control's steps for its start line; None when they cannot be known yet (the phase then
    computes them itself, and fails there, with its manifest saying why)."""
    try:
        return phase.planned_steps(ctx) if phase.planned_steps else None
    except (KeyError, TypeError, ValueError):
        return None


PHASE_GROUPS = {"score": "score_1", "train": "wmss_1", "eval": "eval", "report": "report"}


def run_phase(cfg: WMSSConfig, name: str, force: bool = False) -> dict[str, Any]:
    """Run the pipeline up to and including one phase (earlier completed phases are skipped).

    ``name`` is a phase name or a group: score -> score_1, train -> wmss_1, eval, report.
    """
    target = PHASE_GROUPS.get(name, name)
    return run_pipeline(cfg, from_phase=target if force else None, until=target)
