"""Smoke test of a Ray cluster, as a job: connect, run tiny tasks, check shared storage and the
preemption signal, report.

    wmss submit --entrypoint check_cluster ...     (or)
    ray job submit --address http://HEAD:8265 -- python -m jobs.check_cluster \
        --storage /mnt/wmss --out /mnt/wmss/check.json

Connects with ``ray.init(address="auto")`` (never starts a cluster), runs ``--tasks`` small remote
tasks, and with ``--storage DIR`` has one task pinned to every alive node write a file under
``DIR/.wmss-check/`` that the driver then reads back: this proves the volume is really shared
(ReadWriteMany) and writable by the job's user on every node. ``DIR`` may be an object-store URI
(``s3://bucket/runs``, as ``run.storage``): then it proves every node reaches the store with its
own credentials; the files go through ``wmss_ray.io.storage``, never to a local folder named
``s3:``. A node that cannot write is named in ``storage.errors`` (the check fails, exit 1).

The preemption signal (``preemption``, :func:`check_preemption`): whether Ray Train's
``get_preemption_info`` and ``FailureConfig.max_preemption_failures`` exist in this Ray, whether
the GCS takes a drain request from this job (a dry probe: a ``DRAIN_NODE_REASON_PREEMPTION``
request for a node id that does not exist, which the GCS accepts and which drains nothing; it goes
through the same authenticated channel as the worker pods' preStop ``ray drain-node``), and, per
node, the grace period its pod declares (``WMSS_TERMINATION_GRACE_S``, which the k8s/ manifests
set equal to ``terminationGracePeriodSeconds``: a pod cannot read its own) and ``ray start``'s
own drain on SIGTERM (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``). It never drains a real node:
a drained node takes no new work until it is gone, so a live test would cripple the cluster it
checks. A node without a declared grace period is a warning, not a failure (a cluster outside
Kubernetes has none).

Prints a JSON summary (cluster resources, nodes, Ray version, whether token auth is on; never the
token) and writes it to ``--out`` when given. Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from wmss_ray.cli import jobs as common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.check_cluster",
        description="Smoke-test the Ray cluster this job runs in (tasks, resources, shared storage, "
                    "the preemption signal).",
    )
    parser.add_argument("--out", metavar="PATH", help="also write the JSON summary here")
    parser.add_argument("--storage", metavar="DIR",
                        help="shared directory or object-store URI every node must reach (e.g. /mnt/wmss, s3://bucket/runs)")
    parser.add_argument("--tasks", type=int, default=4, help="number of tiny remote tasks (default 4)")
    parser.add_argument("--address", default="auto", help="Ray address (default: auto)")
    return parser


def _square(x: int) -> dict[str, Any]:
    return {"x": x, "y": x * x, "host": socket.gethostname(), "pid": os.getpid()}


def _write_marker(directory: str, run_id: str) -> dict[str, Any]:
    """On one node: write ``<directory>/.wmss-check/<run_id>/<node_id>.txt``; the error, if any."""
    import ray

    from wmss_ray.io import storage

    node_id = ray.get_runtime_context().get_node_id()
    path = storage.join(directory, ".wmss-check", run_id, f"{node_id}.txt")
    try:
        storage.write_text(path, f"{node_id} {socket.gethostname()} uid={os.getuid()}\n")
    except Exception as err:  # noqa: BLE001 - reported per node in the summary, not raised
        return {"node_id": node_id, "path": path, "error": f"{type(err).__name__}: {err}"}
    return {"node_id": node_id, "path": path}


def check_storage(directory: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """One task pinned to every node in ``nodes`` writes a marker under ``directory`` (a local path
    or a URI); the driver reads each back and deletes them. ``ok``: every node's file is visible."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from wmss_ray.io import storage

    storage.check_scheme(directory)  # an unsupported scheme fails here, naming it
    run_id = uuid.uuid4().hex[:12]
    marker = ray.remote(num_cpus=0)(_write_marker)
    pinned = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
    written = ray.get([marker.options(scheduling_strategy=s).remote(directory, run_id) for s in pinned], timeout=300)
    errors = {w["node_id"]: w["error"] for w in written if "error" in w}
    seen = [w for w in written if "error" not in w and storage.exists(w["path"])]  # read back by the driver
    try:
        storage.delete_dir(storage.join(directory, ".wmss-check", run_id))
    except Exception:  # noqa: BLE001 - cleanup only; the check's answer is already known
        pass
    return {"dir": storage.redact(directory), "nodes_written": len(written) - len(errors),
            "visible_to_driver": len(seen), "errors": errors, "ok": len(seen) == len(nodes) and not errors}


GRACE_ENV = "WMSS_TERMINATION_GRACE_S"  # set by the k8s/ manifests = terminationGracePeriodSeconds
SIGTERM_DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"  # Ray's; its default when unset
PROBE_MESSAGE = "wmss check_cluster: dry probe for a node id that does not exist"


def _env_seconds(name: str) -> float | None:
    value = os.environ.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _node_grace() -> dict[str, Any]:
    """On one node: the pod's declared grace period and ``ray start``'s SIGTERM drain (seconds)."""
    import ray
    from ray._private import ray_constants

    drain = _env_seconds(SIGTERM_DRAIN_ENV)
    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "grace_s": _env_seconds(GRACE_ENV),
            "sigterm_drain_s": drain if drain is not None else ray_constants.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S}


def drain_probe(gcs_address: str) -> dict[str, Any]:
    """Ask the GCS at ``gcs_address`` to drain a node id that does not exist (reason PREEMPTION):
    ``reachable`` when the request went through (token auth included), ``accepted`` its answer."""
    import ray
    from ray.core.generated import autoscaler_pb2

    try:
        gcs = ray._raylet.GcsClient(address=gcs_address)
        accepted, message = gcs.drain_node(ray.NodeID.from_random().hex(),
                                           autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                           PROBE_MESSAGE, 0, timeout=30)
    except Exception as err:  # noqa: BLE001 - reported in the summary: the drain path does not work
        return {"reachable": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {"reachable": True, "accepted": bool(accepted), **({"message": message} if message else {})}


def check_preemption(nodes: list[dict[str, Any]], gcs_address: str | None = None) -> dict[str, Any]:
    """Whether a node drain reaches Ray Train here (see the module docstring); ``ok`` when the API
    is there and the GCS takes drain requests from this job. ``nodes``: the alive nodes."""
    import ray
    from ray import train
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    api = callable(getattr(train, "get_preemption_info", None)) and hasattr(train.FailureConfig(),
                                                                             "max_preemption_failures")
    drain = drain_probe(gcs_address or ray.get_runtime_context().gcs_address)
    grace = ray.remote(num_cpus=0)(_node_grace)
    per_node = ray.get([grace.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote() for n in nodes], timeout=300)
    warnings = [f"node {g['node_id'][:12]} ({g['host']}): no {GRACE_ENV}, its pod's grace period is unknown "
                "(outside Kubernetes, or not a k8s/ manifest of this repository)"
                for g in per_node if g["grace_s"] is None]
    return {"train_api": api, "drain_api": drain, "nodes": per_node, "warnings": warnings,
            "ok": bool(api and drain.get("reachable") and drain.get("accepted"))}


def check(tasks: int, storage: str | None) -> dict[str, Any]:
    import ray

    t0 = time.monotonic()
    square = ray.remote(num_cpus=0.1)(_square)
    results = ray.get([square.remote(i) for i in range(tasks)], timeout=300)
    ok_tasks = [r["y"] for r in results] == [i * i for i in range(tasks)]
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    summary: dict[str, Any] = {
        "ray_version": ray.__version__,
        "python": sys.version.split()[0],
        "token_auth": os.environ.get("RAY_AUTH_MODE", "").lower() == "token",
        "cluster_resources": ray.cluster_resources(),
        "available_resources": ray.available_resources(),
        "alive_nodes": len(nodes),
        "tasks": {"count": tasks, "ok": ok_tasks, "hosts": sorted({r["host"] for r in results})},
    }
    if storage:
        summary["storage"] = check_storage(storage, nodes)
    summary["preemption"] = check_preemption(nodes)
    summary["ok"] = ok_tasks and summary.get("storage", {}).get("ok", True) and summary["preemption"]["ok"]
    summary["seconds"] = round(time.monotonic() - t0, 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary: dict[str, Any] = {}

    def body() -> None:
        common.connect(args.address)
        summary.update(check(args.tasks, args.storage))
        text = json.dumps(summary, indent=2, sort_keys=True)
        print(text, flush=True)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")

    code = common.run(body)
    return code if code else (0 if summary.get("ok") else 1)


if __name__ == "__main__":
    raise SystemExit(main())
