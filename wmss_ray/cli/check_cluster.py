"""Smoke test of a Ray cluster, as a job: connect, run tiny tasks, check shared storage, report.

    wmss submit --entrypoint check_cluster ...     (or)
    ray job submit --address http://HEAD:8265 -- python -m jobs.check_cluster \
        --storage /mnt/wmss --out /mnt/wmss/check.json

Connects with ``ray.init(address="auto")`` (never starts a cluster), runs ``--tasks`` small remote
tasks, and with ``--storage DIR`` has one task pinned to every alive node write a file under
``DIR/.wmss-check/`` that the driver then reads back: this proves the volume is really shared
(ReadWriteMany) and writable by the job's user on every node. ``DIR`` may be an object-store URI
(``s3://bucket/runs``, as ``run.storage``): then it proves every node reaches the store with its
own credentials; the files go through ``wmss_ray.io.storage``, never to a local folder named
``s3:``. A node that cannot write is named in ``storage.errors`` (the check fails, exit 1). Prints a JSON summary (cluster
resources, nodes, Ray version, whether token auth is on; never the token) and writes it to
``--out`` when given. Exit code 0 when every check passed, 1 otherwise.
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
        description="Smoke-test the Ray cluster this job runs in (tasks, resources, shared storage).",
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
    summary["ok"] = ok_tasks and summary.get("storage", {}).get("ok", True)
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
