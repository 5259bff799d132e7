"""What the node-fault tests (``tests/test_node_faults.py``) read of a run and of its cluster while it
goes on: its metrics and worker events, Ray Train's registered checkpoints, the actors' nodes, the
drain notices in Ray Train's worker logs; and the waiting, polling and threads they act with."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from wmss_ray.training.rank_loop import RUN_NAME


def wait_for(pred, what: str, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def logged(out: Path, step: int) -> bool:
    try:
        return any(json.loads(line)["step"] >= step for line in (out / "metrics.jsonl").read_text().splitlines()
                   if line.strip())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def registered(out: Path, step: int) -> bool:
    """Ray Train's controller has recorded checkpoint ``step`` (it restores only those)."""
    snap = out / RUN_NAME / "checkpoint_manager_snapshot.json"
    return snap.exists() and f"checkpoint_{step:06d}" in snap.read_text()


def gone(pid: int) -> bool:
    """The process ``pid`` has ended (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()
    except FileNotFoundError:
        return True


def actor_nodes(class_part: str) -> dict[int, str]:
    """``{pid: node id}`` of the alive actors whose class name contains ``class_part`` (from the
    GCS: the state API needs the dashboard, which this cluster does not run)."""
    from ray._private.state import actors

    return {a["Pid"]: a["Address"]["NodeID"] for a in actors().values()
            if class_part in a["ActorClassName"] and a["State"] == "ALIVE" and a.get("Pid")}


def stop_step(out: Path) -> int | None:
    """The step at which the ranks stopped for a signal (``workers.jsonl``), once both have."""
    steps = {e["rank"]: e["step"] for e in events(out) if e["event"] == "stop"}
    return steps[0] if len(steps) == 2 and steps[0] == steps[1] else None


def told_of_drain(deadline_ms: int) -> set[int]:
    """The ranks whose Train worker holds the drain of ``deadline_ms``: what
    ``ray.train.get_preemption_info()`` (rank 0's, broadcast) returns at their next stop poll.
    ``RayTrainWorker.mark_preempt`` stores it and logs ``Rank R received preemption signal (...,
    deadline_ms=D)`` to Ray Train's system worker logs of the session (ray.train at DEBUG, whatever
    the run's log level); no public API reads a worker's preemption state from outside."""
    import re

    from ray.train.v2._internal.logging.logging import LoggingManager

    ranks = set()
    for log in Path(LoggingManager.get_log_directory()).glob("ray-train-sys-worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            m = re.search(r"Rank (\d+) received preemption signal", line)
            if m and f"deadline_ms={deadline_ms})" in line:
                ranks.add(int(m.group(1)))
    return ranks


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "workers.jsonl").read_text().splitlines()]


def in_thread(fn) -> threading.Thread:
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as err:  # surfaced by the test after the run
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors
    t.start()
    return t


def joined(t: threading.Thread) -> None:
    t.join(timeout=300)
    if t.errors:
        raise t.errors[0]
