"""The weak pool on a real local Ray cluster: ZeRO-3 shards split each request's rows and answer
like a plain copy, uneven request streams do not hang a sharded replica, routing spreads load,
impossible pools fail fast."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from tests.training.test_training_units import make_artifacts
from tests.weak_pool.rows import RowsById
from wmss_ray.weak_pool.group import PoolClient, PoolPlacementError, ServerArgs, WeakPool
from wmss_ray.weak_pool.server import WeakServer
from wmss_ray.weak_pool.wire import WeakRequest, reply_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FORCE_PARTITION = {"stage3_param_persistence_threshold": 0}  # tiny params would stay whole otherwise


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("pool_group"))


def _requests(art, n, sizes=(2,)):
    """``n`` padded requests of ``sizes[i % len(sizes)]`` rows each."""
    rows = RowsById.from_parquet(art["tokenized"])
    return [WeakRequest.from_batch(rows.batch([f"s{(2 * i + j) % 40:04d}" for j in range(sizes[i % len(sizes)])],
                                              pad_id=0), n_exact=2)
            for i in range(n)]


@ray.remote(num_cpus=0)
def _send(handles, reqs, rank):
    client = PoolClient(handles, rank)
    tickets = [client.submit(r) for r in reqs]
    return [client.get(t) for t in tickets]


def test_sharded_replica_matches_plain_server_under_uneven_streams(ray_cluster, art):
    pool = WeakPool(ServerArgs(art["weak"], top_k=4, ds_overrides=FORCE_PARTITION), replicas=1, shards=2,
                    cpus_per_actor=0.5, gpus_per_actor=0)
    try:
        held = ray.get(pool.handles[0].shard_held_numel.remote())
        plain = WeakServer(art["weak"], top_k=4)
        total = plain.held_numel()
        assert len(held) == 2 and max(held) < 0.6 * total  # really sharded: each holds about half
        sizes = (2, 3, 1, 5)  # odd row counts, and a request with fewer rows than shards
        reqs = _requests(art, 10, sizes)
        rows = [len(r.lengths) for r in reqs]
        # two "Train ranks" sending 3 and 7 requests at once: the coordinator serialises them, so
        # both shards run all 10 forwards in the same order and nothing hangs
        a, b = ray.get([_send.remote(pool.handles, reqs[:3], 0), _send.remote(pool.handles, reqs[3:], 1)], timeout=300)
        assert ray.get(pool.handles[0].shard_forwards.remote()) == [10, 10]
        # each shard served its own half of every request's rows (the extra row of an odd count to
        # shard 0; the 1-row requests' shard 1 ran a filler forward), not all of them
        served = pool.served()[0]
        assert [s["rows"] for s in served] == [sum(-(-n // 2) for n in rows), sum(n // 2 for n in rows)]
        assert sum(s["tokens"] for s in served) == sum(int(r.lengths.sum()) for r in reqs)
        assert "replica 0 [" in pool.served_line()
        for req, reply in zip(reqs, a + b):
            ref = plain.answer(req)
            assert np.array_equal(reply.topk_ids, ref.topk_ids)
            np.testing.assert_allclose(reply.topk_logp, ref.topk_logp, atol=1e-5)
            np.testing.assert_allclose(reply.label_logp, ref.label_logp, atol=1e-5)
            np.testing.assert_allclose(reply.tail_logmass, ref.tail_logmass, atol=1e-5)
            np.testing.assert_allclose(reply.exact_logp, ref.exact_logp, atol=1e-5)
            assert reply.nbytes == reply_bytes(len(req.labels), 4, reply.vocab, n_exact=len(req.exact_rows))
            assert reply.checkpoint_id == plain.checkpoint_id
    finally:
        pool.shutdown()


def test_least_loaded_routing_spreads_a_burst(ray_cluster, art):
    pool = WeakPool(ServerArgs(art["weak"], top_k=0), replicas=2, shards=1, cpus_per_actor=0.5, gpus_per_actor=0)
    try:
        client = PoolClient(pool.handles, rank=1)
        tickets = [client.submit(r) for r in _requests(art, 6)]
        assert client.sent == [3, 3] and tickets[0][1] == 1  # rank 1 starts on replica 1
        replies = [client.get(t) for t in tickets]
        assert client.in_flight == [0, 0] and all(r.dense_logp is not None for r in replies)
    finally:
        pool.shutdown()


def test_pool_that_cannot_fit_fails_at_once_naming_resources(ray_cluster, art):
    t0 = time.perf_counter()
    with pytest.raises(PoolPlacementError) as err:
        WeakPool(ServerArgs(art["weak"], top_k=4), replicas=2, shards=2, cpus_per_actor=8, gpus_per_actor=0,
                 reserved={"CPU": 2.0})
    msg = str(err.value)
    assert "CPU=32" in msg and "CPU=34" in msg and "cluster has" in msg and "available" in msg
    with pytest.raises(PoolPlacementError, match="GPU"):
        WeakPool(ServerArgs(art["weak"], top_k=4), 1, 1, cpus_per_actor=0.5, gpus_per_actor=0.5)
    assert time.perf_counter() - t0 < 30  # no waiting for resources that do not exist


def test_pool_that_cannot_be_placed_now_fails_after_its_timeout(ray_cluster, art):
    from ray.util.placement_group import placement_group, remove_placement_group

    hog = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])  # every CPU taken (once released)
    ray.get(hog.ready(), timeout=120)
    try:
        with pytest.raises(PoolPlacementError, match="could not be placed within 2 s") as err:
            WeakPool(ServerArgs(art["weak"], top_k=4), 1, 1, cpus_per_actor=1, gpus_per_actor=0, timeout_s=2)
        assert "CPU=1" in str(err.value)
    finally:
        remove_placement_group(hog)
