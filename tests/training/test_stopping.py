"""``training/stopping.py`` without Ray: the ranks agree on one answer, rank 0 alone reads the stop
marker (at most once a second), a preemption outranks a stop request, SIGTERM to the driver
writes the marker, and a preempted rank that is never torn down fails instead of hanging."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket

import pytest

from wmss_ray.training import stopping
from wmss_ray.training.stopping import STOP_MARKER, StopPoll, clear_stop, driver_stop_on_sigterm, request_stop


def _agree(rank: int, world: int, port: int, codes: list[int], out) -> None:
    import torch.distributed as dist

    from tests.training.forked_ranks import drop_inherited_groups

    drop_inherited_groups()  # this process may have inherited the test session's 1-rank group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.put((rank, stopping.agree_max(codes[rank])))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_largest_code():
    """One rank saw the preemption (2), one a stop request (1): both act on the preemption."""
    from tests.training.forked_ranks import frozen_heap

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(r, 2, port, [stopping.STOP, stopping.PREEMPTION], out))
             for r in range(2)]
    with frozen_heap():
        for p in procs:
            p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got == {0: stopping.PREEMPTION, 1: stopping.PREEMPTION}


def test_outside_a_process_group_the_code_is_the_local_one():
    assert stopping.agree_max(stopping.STOP) == stopping.STOP


def test_rank_0_reads_the_marker_at_most_once_a_second(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: now[0])
    rank0, rank1 = StopPoll(str(tmp_path), 0), StopPoll(str(tmp_path), 1)
    assert rank0() is None  # read at t=100: no marker
    request_stop(str(tmp_path))
    assert (tmp_path / STOP_MARKER).exists()
    now[0] += 0.5
    assert rank0() is None  # not read again before t=101
    assert rank1() is None  # (no process group: only rank 0 ever reads the file)
    now[0] += 0.6
    assert rank0() == "stop"
    assert clear_stop(str(tmp_path)) and not clear_stop(str(tmp_path))


def test_a_preemption_outranks_a_stop_request_and_keeps_its_deadline(tmp_path):
    request_stop(str(tmp_path))
    calls = []
    poll = StopPoll(str(tmp_path), 0, preemption=lambda: calls.append(1) or 1234.5)
    assert poll() == "preemption" and poll.deadline_s == 1234.5 and calls == [1]


def test_the_preemption_callable_is_called_at_every_poll_on_every_rank(tmp_path):
    """Ray's ``get_preemption_info`` is a barrier: every rank must call it equally often."""
    calls = {0: 0, 1: 0}

    def counting(rank):
        def call():
            calls[rank] += 1
        return call

    polls = [StopPoll(str(tmp_path), r, preemption=counting(r)) for r in (0, 1)]
    for _ in range(3):
        for p in polls:
            p()
    assert calls == {0: 3, 1: 3}


def test_a_preempted_rank_that_is_not_torn_down_fails_after_the_slack(tmp_path):
    now = [1000.0]
    poll = StopPoll(str(tmp_path), 0, preemption=lambda: 1010.0)
    assert poll() == "preemption"
    with pytest.raises(RuntimeError, match="did not restart the run"):
        poll.wait_for_restart(clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] >= 1010.0 + stopping.WAIT_SLACK_S


def test_sigterm_to_the_driver_writes_the_marker_and_the_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with driver_stop_on_sigterm(str(tmp_path)):
        os.kill(os.getpid(), signal.SIGTERM)
        assert (tmp_path / STOP_MARKER).exists()
    assert signal.getsignal(signal.SIGTERM) is before
