"""Smoke test of a Ray cluster, as a job: connect, run tiny tasks, check shared storage, report.

    wmss submit --entrypoint check_cluster ...     (or)
    ray job submit --address http://HEAD:8265 -- python -m jobs.check_cluster \
        --storage /mnt/wmss --out /mnt/wmss/check.json

Connects with ``ray.init(address="auto")`` (never starts a cluster), runs ``--tasks`` small remote
tasks, and with ``--storage DIR`` has one task pinned to every alive node write a file under
``DIR/.wmss-check/`` that the driver then reads back: this proves the volume is really shared
(ReadWriteMany) and writable by the job's user on every node. Prints a JSON summary (cluster
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

from jobs import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.check_cluster",
        description="Smoke-test the Ray cluster this job runs in (tasks, resources, shared storage).",
    )
    parser.add_argument("--out", metavar="PATH", help="also write the JSON summary here")
    parser.add_argument("--storage", metavar="DIR", help="shared directory every node must see (e.g. /mnt/wmss)")
    parser.add_argument("--tasks", type=int, default=4, help="number of tiny remote tasks (default 4)")
    parser.add_argument("--address", default="auto", help="Ray address (default: auto)")
    return parser


def _square(x: int) -> dict[str, Any]:
    return {"x": x, "y": x * x, "host": socket.gethostname(), "pid": os.getpid()}


def _write_marker(directory: str, run_id: str) -> dict[str, Any]:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    path = Path(directory) / ".wmss-check" / run_id / f"{node_id}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{node_id} {socket.gethostname()} uid={os.getuid()}\n")
    return {"node_id": node_id, "path": str(path)}


def check(tasks: int, storage: str | None) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
        run_id = uuid.uuid4().hex[:12]
        marker = ray.remote(num_cpus=0)(_write_marker)
        pinned = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
        refs = [marker.options(scheduling_strategy=s).remote(storage, run_id) for s in pinned]
        written = ray.get(refs, timeout=300)
        seen = [w for w in written if Path(w["path"]).is_file()]  # read back on the driver's node
        summary["storage"] = {"dir": storage, "nodes_written": len(written), "visible_to_driver": len(seen),
                              "ok": len(seen) == len(nodes)}
        for w in seen:
            Path(w["path"]).unlink()
        try:
            (Path(storage) / ".wmss-check" / run_id).rmdir()
        except OSError:
            pass
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
