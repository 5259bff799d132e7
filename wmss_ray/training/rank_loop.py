"""One rank's whole phase: resume, the step loop, checkpoints, in-run validation, export. No Ray.

:func:`run_rank` is what every training worker runs. Ray Train's worker function
(``ray_worker.train_loop_per_worker``) calls it with Ray's checkpoint and report; tests run it
on forked gloo ranks with a plain directory for both (the same loop, without a worker-group
start-up per run).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.training.checkpointing import staging_dir
from wmss_ray.training.metrics import MetricsWriter, is_log_step
from wmss_ray.training.stopping import StopPoll
from wmss_ray.training.validation import keep_peak, node_copy, resume_peak, validate_on_ranks
from wmss_ray.training.worker import PhaseSpec, PhaseWorker

#: Ray Train's run name: checkpoints are ``<out_dir>/ray_train/checkpoint_<step>/``.
RUN_NAME = "ray_train"
#: Where ``export_at_stop`` puts the model of a stopped (not finished) run, overwritten each time.
INTERIM_MODEL = "interim_model"

#: ``report(metrics, checkpoint_dir, checkpoint_name)``: hand a step's metrics (and, at a
#: checkpoint step, the directory just saved and its name ``checkpoint_<step:06d>``) to whoever
#: runs the rank; the directory is deleted when it returns.
Report = Callable[[dict[str, Any], "str | None", "str | None"], None]


def run_rank(cfg: WMSSConfig, spec: PhaseSpec, rank: int, world: int, device: Any, *,
             report: Report, resume_dir: Callable[[], Any] | None = None,
             pool_handles: list | None = None, stop_poll: StopPoll | None = None) -> None:
    """Train ``spec``'s phase on this rank, from its last checkpoint to ``spec.end_step``.

    Needs an initialised ``torch.distributed`` group of ``world`` ranks (all run this call).
    ``resume_dir``: a context manager factory yielding the checkpoint directory to resume from
    (None: start at step 0). Rank 0 writes ``metrics.jsonl``; every rank appends its start/end
    to ``workers.jsonl``; the finished run exports ``<out_dir>/model``. With
    ``spec.validation.keep_peak`` the validation-selected peak is kept (``training/validation.py``):
    the finished run's ``<out_dir>/model`` is validated too and competes.

    ``stop_poll`` (collective, every step boundary; ``training/stopping.py``): on a preemption or a
    stop request every rank saves a checkpoint of that step at once (not at the next
    ``checkpoint_every``) and reports it; then on a preemption the ranks wait for Ray Train to
    restart them from it, on a stop request they return without export.
    """
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use `torch.distributed.*")
    timings: dict[str, float] = {}
    last = [time.perf_counter()]

    def lap(name: str) -> None:  # seconds since the previous lap
        now = time.perf_counter()
        timings[name], last[0] = round(now - last[0], 3), now

    spec = spec.for_world(world)  # elastic / resized: the same global batch, grad-accum follows the world size
    worker = PhaseWorker(cfg, spec, rank, world, device, pool_handles=pool_handles)
    lap("init")
    start = 0
    if resume_dir is not None:
        with resume_dir() as ckpt_dir:
            start = worker.load(ckpt_dir)
    end = spec.end_step
    _log_worker(spec, {"event": "start", "rank": rank, "pid": os.getpid(), "start_step": start})
    lap("resume")
    writer = MetricsWriter(spec.out_dir, start) if rank == 0 else None
    t = cfg.training
    keeps_peak = spec.validation is not None and spec.validation.keep_peak
    peak = resume_peak(spec.out_dir, start, rank) if keeps_peak else None  # collective
    try:
        for step in range(start, end):
            metrics = worker.train_step(step)
            done = step + 1
            log = is_log_step(done, t.log_every, end)
            validate = spec.validation is not None and spec.validation.due(done, spec.plan.total_steps)
            # a validation point is also a checkpoint: a restarted trial resumes after its last report
            ckpt = done == end or validate or (t.checkpoint_every and done % t.checkpoint_every == 0)
            if writer is not None and log:
                writer.write(metrics)
                if metrics.get("trunc_warning"):
                    warnings.warn(f"step {done}: weak top-k truncation may move the loss by up to "
                                  f"{metrics['trunc_bound']:.3g} nats/token (> mix.pool.error_warn "
                                  f"{cfg.mix.pool.error_warn}); raise mix.pool.top_k", stacklevel=1)
            if validate:
                metrics = {**metrics, **validate_in_run(worker, cfg, spec, done, rank, world, device)}
                if keeps_peak:  # before the checkpoint: a restart after it never validates this step again
                    peak = keep_peak(metrics, peak, spec.out_dir, storage.join(spec.out_dir, INTERIM_MODEL), rank,
                                     final=False)
            if ckpt:
                _save_and_report(worker, rank, done, metrics, report)
            elif log:
                report(metrics, None, None)
            _maybe_inject_fault(spec, rank, done, checkpointed=bool(ckpt))
            if spec.fault.get("pause_step") == done:  # test hook: a node-fault test acts while the run waits
                _pause(spec)
            reason = stop_poll() if stop_poll is not None and done < end else None
            if reason is not None:
                if not ckpt:  # just in time: the steps since the last checkpoint are kept
                    _save_and_report(worker, rank, done, metrics, report)
                _log_worker(spec, {"event": "stop", "rank": rank, "pid": os.getpid(), "reason": reason, "step": done})
                if reason == "preemption":
                    if writer is not None:
                        writer.close()  # its last records reach storage before the node goes
                        writer = None
                    stop_poll.wait_for_restart()  # returning would end the run as finished
                return
        lap("train")
        if end == spec.plan.total_steps:
            export_model(worker, spec.out_dir, rank)
            if keeps_peak:  # the final model competes for the peak
                validate_final(cfg, spec, peak, end, rank, world, device)
        elif spec.export_at_stop:  # a tune trial evaluates the model between chunks of its phase
            export_model(worker, spec.out_dir, rank, INTERIM_MODEL)
        lap("export")
        _log_worker(spec, {"event": "end", "rank": rank, "pid": os.getpid(), "end_step": end, "seconds": timings,
                           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "peak_gpu_mb": _peak_gpu_mb(worker.device)})
    finally:
        if writer is not None:
            writer.close()


def _save_and_report(worker: Any, rank: int, done: int, metrics: dict[str, Any], report: Report) -> None:
    """Checkpoint step ``done`` (collective): stage this rank's part locally, hand it to ``report``."""
    with tempfile.TemporaryDirectory(prefix=f"wmss-ckpt-r{rank}-",
                                     dir=staging_dir(worker.cfg.training.staging_dir)) as tmp:
        worker.save(tmp, done, metrics["samples_seen"])
        report(metrics, tmp, f"checkpoint_{done:06d}")


def export_model(worker: Any, out_dir: str, rank: int, name: str = "model") -> None:
    """Export the strong model to ``<out_dir>/<name>`` (collective); remote: via a local temp dir.

    Rank 0 alone writes (or uploads) the directory; every rank returns only once it is complete,
    so that whatever reads it next on any rank (in-run validation) finds the whole new model,
    not a missing, half-written or previous one.
    """
    if not storage.is_remote(out_dir):
        worker.export(os.path.join(out_dir, name))
    else:
        with tempfile.TemporaryDirectory(prefix=f"wmss-export-r{rank}-",
                                         dir=staging_dir(worker.cfg.training.staging_dir)) as tmp:
            written = worker.export(os.path.join(tmp, name))
            if rank == 0 and written:
                storage.upload_dir(written, storage.join(out_dir, name))
    _barrier()


def validate_in_run(worker: Any, cfg: WMSSConfig, spec: PhaseSpec, done: int, rank: int, world: int,
                    device: Any) -> dict[str, Any]:
    """A validation point (collective): export the strong model to ``<out_dir>/interim_model``,
    then validate it on every rank (``validation.validate_on_ranks``); returns its metrics.

    On object storage the export goes up once (rank 0) and comes down once per node, into a
    local folder keyed by the step (``validation.node_copy``), removed after the validation."""
    export_model(worker, spec.out_dir, rank, INTERIM_MODEL)  # returns when rank 0's files are complete
    with node_copy(storage.join(spec.out_dir, INTERIM_MODEL), f"step{done}", cfg) as model_dir:
        return validate_on_ranks(cfg, spec.validation, model_dir, done, rank, world, device)


def validate_final(cfg: WMSSConfig, spec: PhaseSpec, peak: dict[str, Any] | None, end: int, rank: int, world: int,
                   device: Any) -> dict[str, Any] | None:
    """``keep_peak`` (collective): validate the exported final model ``<out_dir>/model`` as step
    ``end`` (``validation_step<end>/``) and let it compete for the peak; returns the peak."""
    final = storage.join(spec.out_dir, "model")
    with node_copy(final, f"step{end}", cfg) as model_dir:
        metrics = validate_on_ranks(cfg, spec.validation, model_dir, end, rank, world, device)
    return keep_peak(metrics, peak, spec.out_dir, final, rank, final=True)


def _peak_gpu_mb(device: Any) -> float | None:
    """The most GPU memory this process's tensors held on ``device`` (MiB); None on the CPU."""
    import torch

    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _barrier() -> None:
    """Wait for every rank (no-op outside an initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _log_worker(spec: PhaseSpec, record: dict[str, Any]) -> None:
    """Append to ``<out_dir>/workers.jsonl``: which process ran which rank from which step, timings.

    On object storage (no appends: read + rewrite) each rank has its own ``workers_rank<r>.jsonl``
    so that ranks never overwrite each other's lines.
    """
    name = f"workers_rank{record['rank']}.jsonl" if storage.is_remote(spec.out_dir) else "workers.jsonl"
    storage.append_text(storage.join(spec.out_dir, name), json.dumps(record) + "\n")


#: Test hook (``PAUSE_ENV``): a paused rank goes on once this file is in ``out_dir`` (or after the
#: pause's seconds): the test writes it when it has acted, however long that took under load.
PAUSE_RELEASE = ".pause_release"


def _pause(spec: PhaseSpec) -> None:
    """Test hook: wait after step ``pause_step`` until the test releases the run (``PAUSE_RELEASE``)
    or ``pause_s`` passed."""
    deadline = time.monotonic() + spec.fault["pause_s"]
    marker = storage.join(spec.out_dir, PAUSE_RELEASE)
    while time.monotonic() < deadline and not storage.exists(marker):
        time.sleep(0.1)


def _maybe_inject_fault(spec: PhaseSpec, rank: int, done: int, checkpointed: bool) -> None:
    """Test hook: SIGKILL this process once (a marker file makes the restarted worker pass).

    After a checkpoint step it first waits (up to 60 s) until Ray Train's controller has recorded
    that checkpoint in its snapshot: a worker killed at once races the controller's next poll,
    and a checkpoint the controller never registered is not restored (Ray Train V2)."""
    if spec.fault.get("rank") != rank or spec.fault.get("step") != done:
        return
    marker = storage.join(spec.out_dir, ".fault_injected")
    if storage.exists(marker):
        return
    snapshot = storage.join(spec.out_dir, RUN_NAME, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + 60
    while checkpointed and time.monotonic() < deadline and not (
            storage.exists(snapshot) and f"checkpoint_{done:06d}" in storage.read_text(snapshot)):
        time.sleep(0.1)
    storage.write_text(marker, str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
