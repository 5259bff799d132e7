"""The manifests' preemption handling (docs/CLUSTER.md, "Grace periods"): every Ray pod's
``terminationGracePeriodSeconds`` with what it declares to ``check_cluster``, the worker preStop
that drains its own Ray node (parsed by Ray's own ``ray drain-node`` command line, and run under
``sh`` with stand-ins for ``ray``, ``grep`` and ``sleep``), and ``ray start``'s drain on SIGTERM
inside what is left. The token the preStop's ``ray drain-node`` uses is the container's
``RAY_AUTH_TOKEN`` (test_manifests.py checks it on every Ray container)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from tests.k8s import validate as kv
from tests.k8s.manifests import GPU_TARGETS, TARGETS

MARGIN_S = 60  # after the drain deadline: ray start's SIGTERM drain (<= half of it) and the teardown
GPU_GRACE_S = 600  # a just-in-time checkpoint of the 4B / 8B recipe (docs/CLUSTER.md)
PRESTOP = re.compile(r"ray drain-node (?P<args>.+?) \|\| exit 1; t=0; "
                     r"while \[ \"\$t\" -lt (?P<bound>\d+) \] && grep -qsx raylet /proc/\[0-9\]\*/comm; "
                     r"do sleep 5; t=\$\(\(t \+ 5\)\); done")


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def _prestop(container: dict) -> tuple[str, dict, int]:
    """``(script, ray drain-node's parsed options, the wait loop's bound)`` of a worker's preStop."""
    from ray.scripts.scripts import drain_node

    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 3, command
    m = PRESTOP.fullmatch(command[2])
    assert m, f"preStop script not in the expected form: {command[2]!r}"
    params = drain_node.make_context("drain-node", shlex.split(m["args"])).params  # Ray's own parser
    return command[2], params, int(m["bound"])


def _pods(spec: dict):
    """``(role, pod spec)`` of the head and every worker group of a RayCluster spec."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield "worker", group["template"]["spec"]


@pytest.mark.parametrize("target", TARGETS)
def test_grace_periods_and_drain_deadlines_agree(rendered, target):
    for obj in (o for o in rendered[target] if o["apiVersion"] == "ray.io/v1"):
        for spec in kv.cluster_specs(obj):
            for role, pod in _pods(spec):
                grace = pod["terminationGracePeriodSeconds"]
                ray_container = pod["containers"][0]
                env = _env(ray_container)
                where = f"{target} {obj['metadata']['name']} {role}"
                assert grace >= 2 * MARGIN_S and env["WMSS_TERMINATION_GRACE_S"] == str(grace), where
                if target in GPU_TARGETS:
                    assert grace >= GPU_GRACE_S, where
                sigterm_drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
                if role == "head":  # the GCS outlives workers drained at the same time; no preStop
                    assert sigterm_drain == grace - MARGIN_S and "lifecycle" not in ray_container, where
                    continue
                _, params, bound = _prestop(ray_container)
                assert params["reason"] == "DRAIN_NODE_REASON_PREEMPTION", where
                assert params["node_id"] is None and params["address"] is None, where  # its own node, locally
                assert params["deadline_remaining_seconds"] == bound == grace - MARGIN_S, where
                assert 0 < sigterm_drain <= MARGIN_S / 2, where  # the wait, then this drain, then teardown


def test_gpu_rayjobs_are_resubmitted_on_failure(rendered):
    for target in GPU_TARGETS:
        job = next(o for o in rendered[target] if o["kind"] == "RayJob")
        assert 1 <= job["spec"]["backoffLimit"] <= 3, target


def _run_prestop(script: str, tmp_path, ray_rc: int, raylet_alive: bool) -> tuple[int, list[str], int]:
    """Run ``script`` with stand-ins: ``ray`` records its arguments and exits ``ray_rc``; ``grep``
    says the raylet is alive or not; ``sleep`` returns at once. Returns (exit code, ray's argv,
    sleeps)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log, sleeps = tmp_path / "ray.args", tmp_path / "sleeps"
    for name, body in (("ray", f'printf "%s\\n" "$@" > {log}; exit {ray_rc}'),
                       ("grep", f"exit {0 if raylet_alive else 1}"), ("sleep", f"echo . >> {sleeps}")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    rc = subprocess.run(["/bin/sh", "-c", script], env=env, timeout=120).returncode
    args = log.read_text().splitlines() if log.exists() else []
    return rc, args, len(sleeps.read_text().splitlines()) if sleeps.exists() else 0


@pytest.mark.parametrize("target", ["k8s/base", "k8s/overlays/gpu"])
def test_the_prestop_drains_then_waits_for_the_raylet_at_most_until_the_deadline(rendered, target, tmp_path):
    job = next(o for o in rendered[target] if o["kind"] == "RayJob")
    container = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    script, params, bound = _prestop(container)
    rc, args, sleeps = _run_prestop(script, tmp_path / "alive", 0, raylet_alive=True)
    assert rc == 0 and sleeps == bound // 5  # a raylet that never exits: waited until the deadline
    assert args == ["drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "pod terminating",
                    "--deadline-remaining-seconds", str(params["deadline_remaining_seconds"])]
    assert _run_prestop(script, tmp_path / "gone", 0, raylet_alive=False)[::2] == (0, 0)  # drained: no wait
    rc, args, sleeps = _run_prestop(script, tmp_path / "refused", 1, raylet_alive=True)
    assert rc == 1 and sleeps == 0 and args  # a refused drain: a FailedPreStopHook event, then SIGTERM
