"""The weak pool on Ray: ``R`` replicas x ``S`` shard actors, routing, restarts.

Each replica is one :class:`ReplicaCoordinator` actor (shard 0) that creates its ``S - 1``
:class:`ShardFollower` actors itself. For ``S > 1`` the replica's actors form their own
``torch.distributed`` group (gloo on CPU, nccl on GPU; not Ray Train's, which lives in other
processes) and hold the weak model ZeRO-3-sharded (:class:`~.server.WeakServer`,
``zero3=True``). The coordinator is the only caller of its followers: it splits every request's
rows into ``S`` slices (``slices.split_request``: ZeRO-3 data-parallel inference, so ``S``
shards serve ``S`` times the rows of one), hands slice ``i`` to shard ``i``, forwards slice 0
itself and merges the replies in row order. Every shard runs exactly one forward per request,
in the same order (ZeRO-3's gathers are collectives: a shard that skipped one would hang the
rest); a shard whose slice is empty forwards a one-token filler (``WeakServer.join``). Only the
coordinator replies.

Faults: the coordinator runs with ``max_restarts=-1, max_task_retries=-1``. When a follower
dies, the coordinator's forward or its ``ray.get`` on the followers fails, and it exits; Ray
restarts it, which kills the old followers (actors are fate-shared with their owner) and
re-forms the replica from scratch, and re-submits the request that was in flight. The weak
model is frozen, so the retried reply is the same: no training step is lost or repeated.

Placement: one placement group per replica (``S`` bundles of ``cpus_per_actor`` /
``gpus_per_actor``). A pool that cannot fit the cluster next to the Train workers, or whose
placement groups are not ready within ``placement_timeout_s``, fails at once with the
resources asked for and available (never a silent hang).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray

from wmss_ray.cluster import free_port
from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB
from wmss_ray.weak_pool.server import WeakServer
from wmss_ray.weak_pool.slices import merge_replies, split_request
from wmss_ray.weak_pool.wire import WeakReply, WeakRequest

#: Test hook: ``"<replica>:<shard>:<n>"`` makes that shard SIGKILL itself once, after its n-th forward.
POOL_FAULT_ENV = "WMSS_POOL_FAULT_KILL"


class PoolPlacementError(RuntimeError):
    """The pool's actors cannot be placed on this cluster."""


@dataclass
class ServerArgs:
    """How every shard builds its :class:`WeakServer` (identical within a pool)."""

    model_dir: str
    top_k: int
    dtype: str = "float32"
    trust_remote_code: bool = False
    chunk_mb: float = DEFAULT_CHUNK_MB  # mix.chunk_mb: the logits chunk is sized as the training loss's
    use_gpu: bool = False
    ds_overrides: dict | None = None
    attn_implementation: str = "auto"  # models.attn_implementation
    fault: str | None = None  # POOL_FAULT_ENV value
    fault_marker: str | None = None  # the kill happens once: a marker file records it


class _Shard:
    """One process of a replica: its slice of the process group and its WeakServer."""

    def _setup(self, args: ServerArgs, replica: int, rank: int, world: int, addr: str, port: int) -> None:
        import torch

        self.args, self.replica, self.rank = args, replica, rank
        device = "cuda" if args.use_gpu else "cpu"
        if world > 1:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; one device per actor
            torch.distributed.init_process_group(
                "nccl" if args.use_gpu else "gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                world_size=world, timeout=timedelta(seconds=120))
        self.server = WeakServer(args.model_dir, args.top_k, dtype=args.dtype, device=device,
                                 trust_remote_code=args.trust_remote_code, chunk_mb=args.chunk_mb, zero3=world > 1, ds_overrides=args.ds_overrides,
                                 attn_implementation=args.attn_implementation)

    def _forward(self, req: WeakRequest | None) -> WeakReply | None:
        """This shard's slice answered (None: no rows for this shard, a filler forward)."""
        reply = None if req is None else self.server.answer(req)
        if req is None:
            self.server.join()
        a = self.args
        if a.fault and a.fault_marker and not Path(a.fault_marker).exists():
            replica, shard, after = (int(x) for x in a.fault.split(":"))
            if (replica, shard, after) == (self.replica, self.rank, self.server.forwards):
                Path(a.fault_marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return reply

    def pid(self) -> int:
        return os.getpid()

    def forwards(self) -> int:
        return self.server.forwards

    def served(self) -> dict[str, int]:
        return self.server.served()

    def held_numel(self) -> int:
        return self.server.held_numel()


class ShardFollower(_Shard):
    """Shard ``rank >= 1`` of a replica: answers the slices its coordinator sends."""

    def __init__(self, args: ServerArgs, replica: int, rank: int, world: int, addr: str, port: int):
        self._setup(args, replica, rank, world, addr, port)

    def follow(self, req: WeakRequest | None) -> tuple[WeakReply | None, int]:
        """This shard's slice of a request (None: a filler forward): its reply and the forward count."""
        return self._forward(req), self.server.forwards


class ReplicaCoordinator(_Shard):
    """Shard 0 of a replica: creates the followers, splits each request over the shards, replies."""

    def __init__(self, args: ServerArgs, replica: int, shards: int, resources: dict[str, float], pg=None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        addr, port = ray.util.get_node_ip_address(), free_port("")
        follower_cls = ray.remote(max_restarts=0)(ShardFollower)
        self.followers = []
        for rank in range(1, shards):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank) if pg else None
            self.followers.append(follower_cls.options(
                num_cpus=resources.get("CPU", 1.0), num_gpus=resources.get("GPU", 0.0),
                scheduling_strategy=strategy).remote(args, replica, rank, shards, addr, port))
        # Own group + model first: the followers' __init__ block on the same collectives.
        self._setup(args, replica, 0, shards, addr, port)
        ray.get([f.forwards.remote() for f in self.followers])

    def answer(self, wrapped: list) -> WeakReply:
        """``wrapped = [ObjectRef of a WeakRequest]`` (a list, so Ray hands the reference over
        unresolved and the retry after a re-formed replica reads the same request)."""
        slices = split_request(ray.get(wrapped[0]), 1 + len(self.followers))
        pending = [f.follow.remote(s) for f, s in zip(self.followers, slices[1:])]
        try:
            mine = self._forward(slices[0])
            theirs = ray.get(pending)
        except Exception as err:  # a shard died: exit, Ray re-forms the replica and retries
            print(f"weak pool replica {self.replica}: shard failure ({type(err).__name__}: {err}); re-forming",
                  flush=True)
            os._exit(1)
        counts = [c for _, c in theirs]
        if any(c != self.server.forwards for c in counts):  # pragma: no cover - would hang first
            raise RuntimeError(f"replica {self.replica}: forward counts diverged {counts} vs {self.server.forwards}")
        return merge_replies([r for r in [mine] + [r for r, _ in theirs] if r is not None])

    def shard_pids(self) -> list[int]:
        return [os.getpid()] + ray.get([f.pid.remote() for f in self.followers])

    def shard_held_numel(self) -> list[int]:
        return [self.server.held_numel()] + ray.get([f.held_numel.remote() for f in self.followers])

    def shard_forwards(self) -> list[int]:
        return [self.server.forwards] + ray.get([f.forwards.remote() for f in self.followers])

    def shard_served(self) -> list[dict[str, int]]:
        """Each shard's :meth:`~.server.WeakServer.served` (since this replica was last formed)."""
        return [self.server.served()] + ray.get([f.served.remote() for f in self.followers])


def _resource_text(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or v) or "nothing"


class WeakPool:
    """Driver-side handle of a started pool: ``R`` coordinators (``handles``) and their groups.

    Args:
        args: how the shards build their servers.
        replicas, shards: R and S.
        cpus_per_actor, gpus_per_actor: each actor's Ray resources.
        reserved: resources the phase needs besides the pool (the Train workers), checked
            against the cluster's totals so an impossible set-up fails before anything waits.
        timeout_s: how long the placement groups may take to become ready.
    """

    def __init__(self, args: ServerArgs, replicas: int, shards: int, cpus_per_actor: float, gpus_per_actor: float,
                 reserved: dict[str, float] | None = None, timeout_s: float = 60.0):
        from ray.util.placement_group import placement_group, remove_placement_group

        self.replicas, self.shards = replicas, shards
        bundle = {"CPU": float(cpus_per_actor)}
        if gpus_per_actor:
            bundle["GPU"] = float(gpus_per_actor)
        n = replicas * shards
        asked = {k: v * n for k, v in bundle.items()}
        total = ray.cluster_resources()
        need = {k: asked.get(k, 0.0) + (reserved or {}).get(k, 0.0) for k in set(asked) | set(reserved or {})}
        short = [k for k, v in need.items() if v > total.get(k, 0.0) + 1e-9]
        if short:
            raise PoolPlacementError(
                f"weak pool ({replicas} replicas x {shards} shards, each actor {_resource_text(bundle)}) asks for "
                f"{_resource_text(asked)}, plus {_resource_text(reserved or {})} for the Train workers = "
                f"{_resource_text(need)}; the cluster has {_resource_text(total)} in all "
                f"({_resource_text(ray.available_resources())} available now). Lower mix.pool.replicas/shards/"
                "cpus_per_actor/gpus_per_actor or add nodes.")
        self.pgs = [placement_group([dict(bundle) for _ in range(shards)], strategy="PACK") for _ in range(replicas)]
        ready, _ = ray.wait([pg.ready() for pg in self.pgs], num_returns=replicas, timeout=timeout_s)
        if len(ready) < replicas:
            avail = ray.available_resources()
            for pg in self.pgs:
                remove_placement_group(pg)
            raise PoolPlacementError(
                f"weak pool could not be placed within {timeout_s:g} s: asked for {replicas} x {shards} actors of "
                f"{_resource_text(bundle)} ({_resource_text(asked)}); available {_resource_text(avail)} of "
                f"{_resource_text(total)}")
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        coord_cls = ray.remote(max_restarts=-1, max_task_retries=-1)(ReplicaCoordinator)
        self.handles = [
            coord_cls.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0.0),
                              scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
            .remote(args, r, shards, bundle, pg)
            for r, pg in enumerate(self.pgs)
        ]
        ray.get([h.shard_pids.remote() for h in self.handles])  # every replica up (or its error raised)

    def served(self, timeout_s: float = 10.0) -> list[list[dict[str, int]]]:
        """Per replica, each shard's served ``forwards`` / ``rows`` / ``tokens`` (since the replica
        was last formed: a re-formed replica starts again from 0)."""
        return ray.get([h.shard_served.remote() for h in self.handles], timeout=timeout_s)

    def served_line(self) -> str:
        """One console line: the rows each shard served (a balanced replica's shards serve about
        equal shares), or why they are not known."""
        try:
            served = self.served()
        except Exception as err:  # a replica being re-formed or gone: the line says so, shutdown goes on
            return f"weak pool: rows served per shard unknown ({type(err).__name__})"
        return "weak pool: rows served per shard: " + "; ".join(
            f"replica {r} {[s['rows'] for s in shards]} (tokens {[s['tokens'] for s in shards]})"
            for r, shards in enumerate(served))

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        print(self.served_line(), flush=True)
        for h in self.handles:
            ray.kill(h, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)


class PoolClient:
    """A Train worker's view of the pool: least-loaded routing over the replicas it knows.

    ``submit`` puts a request in the object store once and sends it to the replica with the
    fewest of *this client's* requests in flight (ties broken by ``rank`` so the Train ranks
    start on different replicas); ``get`` waits for the reply.
    """

    def __init__(self, handles: list, rank: int = 0):
        if not handles:
            raise ValueError("PoolClient needs at least one replica handle")
        self.handles, self.rank = list(handles), rank
        self.in_flight = [0] * len(handles)
        self.sent = [0] * len(handles)

    def submit(self, req: WeakRequest) -> tuple[Any, int]:
        r = len(self.handles)
        replica = min(range(r), key=lambda i: (self.in_flight[i], (i - self.rank) % r))
        ref = self.handles[replica].answer.remote([ray.put(req)])
        self.in_flight[replica] += 1
        self.sent[replica] += 1
        return ref, replica

    def get(self, ticket: tuple[Any, int]) -> WeakReply:
        ref, replica = ticket
        try:
            return ray.get(ref)
        finally:
            self.in_flight[replica] -= 1
