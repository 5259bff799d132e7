"""Stop at a step boundary with a just-in-time checkpoint: a node drain (preemption) or a stop request.

Two signals end a run early, both seen by every rank at the same step:

- **preemption**: Ray marks a node as draining (``ray drain-node --reason
  DRAIN_NODE_REASON_PREEMPTION``: a spot reclaim, a KubeRay pod's preStop hook); Ray Train's
  preemption watcher tells every worker, and ``ray.train.get_preemption_info()`` returns it. The
  ranks save a checkpoint at once and then *wait*: returning would end the run as finished, so
  the ranks idle until Ray Train tears the group down (the node goes, or its deadline passes) and
  restarts it from that checkpoint, within ``FailureConfig.max_preemption_failures``.
- **stop request**: the driver got SIGTERM (a pod eviction, ``kill``, Ctrl-\\ in a job) and
  wrote ``<out_dir>/.stop_requested`` (:func:`driver_stop_on_sigterm`). Rank 0 sees the marker,
  the ranks save a checkpoint and return; ``train_phase`` then raises :class:`StopRequested`
  (the driver exits non-zero) and a rerun resumes from that checkpoint.

Why a marker file and not a Ray call: the driver must answer SIGTERM within the grace period
even when Ray itself is going away, and ``out_dir`` is the one place every rank already reads
(local, shared filesystem or object storage). Rank 0 reads it at most once a second.

The ranks agree by one all-reduce (max) of a 1-element tensor per step, so all of them save the
same step, however the signals arrived (the watcher's message may reach ranks a step apart).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from wmss_ray.io import storage

#: Written by the driver on SIGTERM, read by rank 0: stop at the next step with a checkpoint.
STOP_MARKER = ".stop_requested"
#: Seconds between rank 0's reads of the marker (a stat, or a HEAD on object storage).
MARKER_EVERY_S = 1.0
#: After a preemption checkpoint, how long the ranks wait past the drain's deadline for Ray Train
#: to tear them down before failing (Ray's own fallback when a drain names no deadline: 120 s).
WAIT_SLACK_S = 120.0

#: Reason codes, ordered: the all-reduce keeps the largest (a preemption outranks a stop request:
#: both save, but a preempted run must be restarted by Ray, not ended).
NONE, STOP, PREEMPTION = 0, 1, 2
REASONS = {STOP: "stop", PREEMPTION: "preemption"}


class StopRequested(RuntimeError):
    """A training phase stopped early on request (SIGTERM to the driver) after a checkpoint."""


class StopPoll:
    """One rank's poll of the stop signals at a step boundary (collective: every rank calls it at
    every step boundary, the same number of times).

    ``preemption``: returns the preemption deadline in seconds since the epoch (``inf`` when the
    drain named none) or None when no node of the run is being drained; it must itself be called
    the same number of times on every rank (Ray's ``get_preemption_info`` is a barrier).
    """

    def __init__(self, out_dir: str, rank: int, device: Any = None,
                 preemption: Callable[[], float | None] | None = None, marker_every_s: float = MARKER_EVERY_S):
        self.marker = storage.join(out_dir, STOP_MARKER)
        self.rank, self.device, self.preemption = rank, device, preemption
        self.marker_every_s = marker_every_s
        self._next_marker_read = 0.0
        self.deadline_s: float | None = None

    def _local(self) -> int:
        code = NONE
        if self.preemption is not None:
            deadline = self.preemption()
            if deadline is not None:
                self.deadline_s, code = deadline, PREEMPTION
        now = time.monotonic()
        if code == NONE and self.rank == 0 and now >= self._next_marker_read:
            self._next_marker_read = now + self.marker_every_s
            if storage.exists(self.marker):
                code = STOP
        return code

    def __call__(self) -> str | None:
        """``"preemption"``, ``"stop"`` or None: the same answer on every rank."""
        return REASONS.get(agree_max(self._local(), self.device))

    def wait_for_restart(self, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                         ) -> None:
        """After a preemption checkpoint: idle until Ray Train tears this worker down (it never
        returns then); raise if that has not happened ``WAIT_SLACK_S`` after the deadline."""
        deadline = self.deadline_s if self.deadline_s not in (None, float("inf")) else clock()
        give_up = deadline + WAIT_SLACK_S
        while clock() < give_up:
            sleep(0.5)
        raise RuntimeError(f"the node was drained for preemption (deadline {deadline:.0f}), the checkpoint is "
                           f"saved, but Ray Train did not restart the run within {WAIT_SLACK_S:.0f} s of it")


def agree_max(code: int, device: Any = None) -> int:
    """The largest ``code`` over all ranks (one all-reduce of a 1-element int tensor; the code
    itself outside an initialised process group). On NCCL the tensor lives on ``device``."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    where = device if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([code], dtype=torch.int32, device=where)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def request_stop(out_dir: str) -> None:
    """Ask the ranks of the run in ``out_dir`` to checkpoint and stop at their next step."""
    storage.write_text(storage.join(out_dir, STOP_MARKER), f"{time.time():.3f}\n")


def clear_stop(out_dir: str) -> bool:
    """Remove a stop request (a new call of the phase starts unstopped); True if there was one."""
    return storage.delete_file(storage.join(out_dir, STOP_MARKER))


@contextlib.contextmanager
def driver_stop_on_sigterm(out_dir: str) -> Iterator[None]:
    """While the block runs, SIGTERM to this process writes the stop marker of ``out_dir``
    instead of killing it: the ranks checkpoint and return, and the caller raises
    :class:`StopRequested`. Outside the main thread (signals cannot be caught there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
        request_stop(out_dir)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
