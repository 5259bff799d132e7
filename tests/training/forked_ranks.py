"""Test support: one training phase on ranks forked from the test process (gloo, CPU), no Ray.

:func:`train_on_forked_ranks` is ``trainer.train_phase`` without Ray Train's edge: the same
``build_spec`` (inputs checked, data plan, epoch rows), then ``cfg.scaling.num_workers`` ranks
forked from this process, each running ``rank_loop.run_rank`` (the loop Ray Train's workers run),
and the same end-of-run checks. For tests about the step (losses, gradient norms, weights against
the plain reference), not about Ray Train's start-up, restore or fault tolerance.

Why fork: a Ray Train fit on the 2-core test box costs ~13-15 s wall (~20 CPU-s), almost all of
it start-up (controller, placement-group cleaner, sync actor, 2 worker processes importing
torch, transformers and DeepSpeed); the tiny training itself is ~1.5 s. Forked ranks start with
the modules this process already imported. A fresh pair of ranks per run: DeepSpeed keeps state
in module globals (ZeRO-3's ``FWD_MODULE_STACK`` after destroy, the comm backend), which a
long-lived worker group would carry from one run into the next.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import traceback
import warnings
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from wmss_ray.cluster import free_port
from wmss_ray.io import storage
from wmss_ray.io.files import read_metrics
from wmss_ray.training.checkpointing import (UntrainedStepsError, check_resumable, check_same_run,
                                             check_trained_all_steps)
from wmss_ray.training.rank_loop import RUN_NAME, run_rank
from wmss_ray.training.trainer import TrainResult, build_spec, checkpoint_states, result_peak


#: Ranks that have not all finished after this long are a hang (a tiny run takes seconds, ~30 s
#: at most on the loaded 2-core CI box): every rank dumps its threads' stacks, then is killed.
RANK_DEADLINE_S = 240
#: Ranks that have not all joined their process group after this long are a hang too: joining is
#: a fork, one thread setting and a file rendezvous (well under a second; the CI hangs were there:
#: cut at 60 s, not after the whole run's deadline).
JOIN_DEADLINE_S = 60


class RankFailed(RuntimeError):
    """A forked rank exited non-zero; the message holds its exit code and traceback."""


class RanksHung(RankFailed):
    """The ranks did not finish within :data:`RANK_DEADLINE_S`; the message holds every rank's stacks."""


def train_on_forked_ranks(cfg, phase: str, strong_init: str, weak_init: str | None, tokenized: str,
                          sampled: str | None, out_dir: str, mode: str | None = None, *, resume: bool = False,
                          **build_spec_kw: Any) -> TrainResult:
    """Train one phase on ``cfg.scaling.num_workers`` forked gloo ranks (CPU), from step 0 or,
    with ``resume``, from the latest checkpoint in ``out_dir`` (as Ray Train restores one).

    Arguments as ``train_phase`` (``build_spec_kw``: ``epochs``, ``exact_steps``, ``stop_after``,
    ``export_at_stop``, ``validation``, ``fingerprint``). Each checkpoint's files from every rank are merged into
    ``<out_dir>/ray_train/checkpoint_<step:06d>/``, as Ray Train merges them, so the result reads
    like ``train_phase``'s: ``model_dir`` (None when stopped early), ``metrics_path``, ``steps``,
    ``total_steps``, ``checkpoint_path`` (the last checkpoint), ``final_metrics``, ``peak``.

    Raises:
        ValueError: ``out_dir`` holds checkpoints and ``resume`` is off (a fresh run must not mix
            with an earlier one's), or ``resume`` is on and it holds none.
        ForeignCheckpointError: ``resume`` and the checkpoints are another run's (as ``train_phase``).
        RankFailed: a rank exited non-zero (the first failed rank's exit code and traceback).
        UntrainedStepsError: the last checkpoint does not show every planned step trained.
    """
    spec = build_spec(cfg, phase, strong_init, weak_init, tokenized, sampled, out_dir, mode, **build_spec_kw)
    states = checkpoint_states(spec.out_dir)
    if bool(states) != resume:
        raise ValueError(f"{spec.out_dir}: {'holds checkpoints; pass resume=True' if states else 'no checkpoint to resume'}")
    latest = None
    if resume:
        for where, state in states:  # before any rank starts, as train_phase
            check_same_run(state, where, spec.fingerprint)
            check_resumable(state, where, spec.plan_fingerprint(), cfg.scaling.worker_counts, cfg.training.zero_stage)
        latest = max(states, key=lambda ws: int(ws[1].get("step", -1)))[0]
    _import_what_ranks_use()
    before = _files(spec.out_dir)
    try:
        _fork_ranks(cfg, spec, latest)
    except RanksHung as hung:
        # Ranks forked from a process with live threads (the test process is a Ray driver) have
        # twice hung before writing anything (in nn.Module.__init__; in gloo's rendezvous, the other
        # rank never connecting): a lock held by a parent thread at the fork, not the code under test.
        # Such a hang is retried once, only when the ranks wrote nothing, so the retry is the same
        # call; the hang is reported as a warning with every rank's stacks. Any other failure raises.
        if before is None or _files(spec.out_dir) != before:
            raise
        warnings.warn(f"forked ranks hung before writing anything; retried once:\n{hung}", stacklevel=2)
        _fork_ranks(cfg, spec, latest)
    return _result(spec)


def _fork_ranks(cfg, spec, latest: str | None) -> None:
    world = cfg.scaling.num_workers
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="wmss-forked-ranks-") as errors:
        ctx = multiprocessing.get_context("fork")  # the children start with this process's imports
        procs = [ctx.Process(target=_rank_main, args=(cfg, spec, rank, world, port, errors, latest), name=f"rank{rank}")
                 for rank in range(world)]
        with frozen_heap():
            for p in procs:
                p.start()
        _join_or_raise(procs, Path(errors))


def _files(out_dir: str) -> list[str] | None:
    """Every file under ``out_dir``, relative: what a run has written there (None on object
    storage: not listed, so a hang there is never retried)."""
    if storage.is_remote(out_dir):
        return None
    return sorted(os.path.relpath(os.path.join(d, f), out_dir) for d, _, fs in os.walk(out_dir) for f in fs)


@contextlib.contextmanager
def frozen_heap():
    """Fork inside this block: the parent's garbage is collected here first, and what remains is
    frozen (``gc.freeze``), so a forked child's garbage collector never finalizes an object it
    inherited. A guard against one likely cause of a hang seen once in CI (a rank stuck 600 s in
    ``nn.Module.__init__``, allocating: where a collection runs finalizers): the test process may be
    a Ray driver, and an inherited object whose finalizer takes a lock one of the parent's threads
    held at the fork waits forever. Not a proven fix: a plain repro (a Ray driver's cyclic
    ``ObjectRef`` garbage collected in a forked child) did not hang."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _import_what_ranks_use() -> None:
    """Import the ranks' libraries here, once, before the fork (each rank importing them itself:
    ~10 s of its start-up on the 2-core test box)."""
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    import wmss_ray.models.loading  # noqa: F401
    import wmss_ray.training.worker  # noqa: F401


def _rank_main(cfg, spec, rank: int, world: int, port: int, errors: str, resume_from: str | None = None) -> None:
    """A forked rank: a fresh gloo group of ``world`` ranks on 127.0.0.1:``port``, then ``run_rank``
    (from the checkpoint directory ``resume_from``, if given).

    Never touches Ray (the test process may hold a live Ray driver). Any exception is written to
    ``<errors>/rank<rank>.txt`` and the process exits 1."""
    import faulthandler

    crash = open(Path(errors, f"rank{rank}.crash"), "w")
    faulthandler.enable(crash)  # a segfault's Python stack (the traceback file covers exceptions)
    # a hang guard, not a speed limit: at the deadline the parent asks every rank for its stacks
    # (SIGUSR1) and kills them (_join_or_raise); this backstop exits a rank whose parent is gone
    faulthandler.register(signal.SIGUSR1, file=crash, all_threads=True)
    faulthandler.dump_traceback_later(RANK_DEADLINE_S + 60, exit=True, file=crash)
    try:
        import torch
        import torch.distributed as dist

        # as a Ray Train worker: one intra-op thread (its runtime env sets OMP_NUM_THREADS=1), and
        # OpenMP with one thread never needs the thread pool the parent may have started before fork
        torch.set_num_threads(1)
        drop_inherited_groups()
        # what Ray Train's TorchConfig sets and DeepSpeed's init_distributed reads
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        # gloo's device on the loopback interface by name (getifaddrs), not by resolving the host
        # name (getaddrinfo, which goes through glibc's NSS locks): a lock a parent thread held at
        # the fork (Ray's gRPC resolves names on threads of its own) is never released in the child.
        # Once in CI both ranks hung 60 s inside ProcessGroupGloo's constructor, where that lookup
        # is; a likely cause, not a proven one (no native stack of the hang).
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        # The rendezvous through a file in this attempt's own directory, not a TCP store on a port
        # chosen before the fork: the parent's port may be taken by then (the suite runs Ray
        # clusters beside), and a TCP store is a libuv server whose state the fork copied from a
        # parent that ran one (init_single_process). Twice in CI both ranks hung inside the TCP
        # store's creation (_create_c10d_store). gloo's own connections still use fresh ports.
        dist.init_process_group("gloo", init_method=Path(errors, "store").as_uri(), rank=rank, world_size=world)
        Path(errors, f"rank{rank}.joined").touch()
        # no destroy_process_group at the end: the rank exits right after (the group dies with it),
        # and gloo's shutdown there hangs in a long test session with both ranks done (py-spy: pg shutdown)
        # resume_dir only when resuming: a test's stand-in run_rank may not take it
        resume = {"resume_dir": lambda: contextlib.nullcontext(resume_from)} if resume_from else {}
        run_rank(cfg, spec, rank, world, torch.device("cpu"), report=_merge_into(spec.out_dir), **resume)
    except BaseException:
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
        _exit(1)
    _exit(0)


def _exit(code: int) -> None:
    """Leave without the parent's exit handlers (its Ray driver's) and without joining threads
    the rank left behind (the loop closed its files)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def drop_inherited_groups() -> None:
    """Forget the process group and DeepSpeed state this process inherited (the test session's
    1-rank group of ``init_single_process``, DeepSpeed's comm backend and cached groups, ZeRO-3's
    forward-module stack), so that the rank starts as a fresh Ray Train worker would.

    The inherited group is dropped, not destroyed: its gloo threads and store server did not
    survive the fork, and ``destroy_process_group`` joins them (a segfault in the child). Its
    objects stay referenced, unused, until the rank exits.
    """
    import sys

    from torch.distributed import distributed_c10d as c10d

    if c10d.is_initialized():
        _ABANDONED.append(c10d._world)
        c10d._world = c10d._World()
        c10d._unregister_all_process_groups()
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None:
        ds_comm.cdb = None  # deepspeed.initialize builds its backend over the new group
        sys.modules["deepspeed.utils.groups"]._release_process_group_references(None)  # its world clone
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()


#: The process-group state a forked rank inherited and dropped (kept alive: see above).
_ABANDONED: list = []


def _merge_into(out_dir: str):
    """``run_rank``'s ``report``: copy a checkpoint's files into ``<out_dir>/ray_train/<name>/``
    (every rank adds its own files: rank 0's module and trainer state, each rank's ZeRO shards)."""
    def report(metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, os.path.join(out_dir, RUN_NAME, name), dirs_exist_ok=True)

    return report


def _join_or_raise(procs: list, errors: Path) -> None:
    """Wait for every rank; at the first non-zero exit kill the others (they would wait in a
    collective for the dead rank) and raise its exit code and traceback. Ranks that have not all
    joined their group after :data:`JOIN_DEADLINE_S`, or are still running after
    :data:`RANK_DEADLINE_S`, dump their stacks and are killed: :class:`RanksHung`."""
    running = list(procs)
    start = time.monotonic()
    while running:
        joined = all((errors / f"{p.name}.joined").exists() for p in procs)
        limit = RANK_DEADLINE_S if joined else JOIN_DEADLINE_S
        left = start + limit - time.monotonic()
        # before every rank joined, look again each second (the join files are not waitable)
        ready = wait([p.sentinel for p in running], timeout=max(min(left, 1.0) if not joined else left, 0))
        if not ready and time.monotonic() >= start + limit:
            for p in running:
                os.kill(p.pid, signal.SIGUSR1)  # only processes this call started
            _wait_for_dumps([errors / f"{p.name}.crash" for p in running])
            for p in running:
                p.kill()
                p.join()
            stacks = "".join(f"--- {p.name} (pid {p.pid}):\n" + _read(errors / f"{p.name}.crash") for p in procs)
            what = "still running" if joined else "not all in their process group"
            raise RanksHung(f"ranks {[p.name for p in running]} {what} after {limit} s:\n{stacks}")
        for sentinel in ready:
            p = next(p for p in running if p.sentinel == sentinel)
            p.join()
            running.remove(p)
            if p.exitcode != 0:
                for other in running:
                    other.kill()  # only processes this call started, by their handle
                    other.join()
                detail = "".join(f.read_text() for f in (errors / f"{p.name}.txt", errors / f"{p.name}.crash")
                                  if f.exists()) or "(no traceback)"
                raise RankFailed(f"{p.name} (pid {p.pid}) exited with code {p.exitcode}:\n{detail}")


def _wait_for_dumps(paths: list[Path], cap_s: float = 5.0) -> None:
    """Until every file holds a stack dump that stopped growing (faulthandler's SIGUSR1 handler
    writes it), at most ``cap_s`` (a rank too stuck to run its handler shows "(nothing)")."""
    end, sizes = time.monotonic() + cap_s, None
    while time.monotonic() < end:
        now = [p.stat().st_size if p.exists() else 0 for p in paths]
        if all(now) and now == sizes:
            return
        sizes = now
        time.sleep(0.1)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else "(nothing)\n"


def _result(spec) -> TrainResult:
    """``train_phase``'s result and end-of-run check, from what the ranks wrote."""
    out = spec.out_dir
    metrics_path = storage.join(out, "metrics.jsonl")
    records = read_metrics(metrics_path) if storage.exists(metrics_path) else []
    states = checkpoint_states(out)
    if not states:
        raise UntrainedStepsError(f"{out}: the ranks ended without a checkpoint of step {spec.end_step}")
    where, last = max(states, key=lambda ws: int(ws[1].get("step", -1)))
    check_trained_all_steps(last, where, spec.fingerprint, spec.end_step)
    finished = spec.end_step == spec.plan.total_steps
    return TrainResult(model_dir=storage.join(out, "model") if finished else None, metrics_path=metrics_path,
                       steps=spec.end_step, final_metrics=records[-1] if records else {}, checkpoint_path=where,
                       total_steps=spec.plan.total_steps, peak=result_peak(spec))

