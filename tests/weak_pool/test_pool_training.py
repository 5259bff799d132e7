"""WMSS frozen training with the weak pool on a real local Ray cluster (2 Train workers, gloo).

``top_k: 0`` is exact: its per-step losses equal colocated frozen training's within 1e-5 and the
exported weights match, for R = 2 x S = 1 and for R = 1 x S = 2 (ZeRO-3 shards), packed
(``training.packing``) against the padded colocated run, with a pool shard SIGKILLed mid-run
(the replica is re-formed, the request retried: no step lost or repeated). ``top_k < V``: the
step-1 loss (same weights in both runs) differs from the exact one by less than the logged bound,
and the sampled measured error is below its bound. The colocated reference runs on 2 forked ranks
(``tests/training/forked_ranks.py``: the same rank loop, no Ray Train start-up); the pool runs stay
on Ray Train, their weak model is served by Ray actors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.training.forked_ranks import train_on_forked_ranks
from tests.training.test_training_units import assert_same_weights, load_hf, make_artifacts, tiny_cfg
from wmss_ray.io.files import read_metrics
from wmss_ray.training.trainer import train_phase
from wmss_ray.weak_pool.group import POOL_FAULT_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 4


def _pool_cfg(**pool):
    cfg = tiny_cfg(zero_stage=0, wmss_epochs=1.5, max_steps=STEPS, checkpoint_every=2, num_workers=2)
    cfg.mix.mode = "frozen"
    if pool:
        cfg.mix.placement = "pool"
        for k, v in {"cpus_per_actor": 0.5, **pool}.items():
            setattr(cfg.mix.pool, k, v)
    return cfg


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("pool_train"))


def _train(cfg, art, out):
    return train_phase(cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"], str(out))


@pytest.fixture(scope="module")
def colocated(art, tmp_path_factory):
    """The reference: colocated frozen WMSS on 2 forked ranks (the rank loop Ray Train runs; the
    colocated weak model needs no Ray actors, so no Train worker group's start-up for it)."""
    res = train_on_forked_ranks(_pool_cfg(), "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"],
                                str(tmp_path_factory.mktemp("colocated")))
    return res, read_metrics(res.metrics_path)


def _assert_equal_runs(res, colocated):
    ref_res, ref = colocated
    metrics = read_metrics(res.metrics_path)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # each step once
    for got, want in zip(metrics, ref):
        assert abs(got["loss"] - want["loss"]) <= 1e-5, (got["loss"], want["loss"])
        assert got["trunc_bound"] == 0 and got["weak_tail_mass_max"] == 0
    assert_same_weights(load_hf(ref_res.model_dir).state_dict(), load_hf(res.model_dir))
    return metrics


def test_dense_pool_two_replicas_equals_colocated_frozen(ray_cluster, art, colocated, tmp_path):
    res = _train(_pool_cfg(top_k=0, replicas=2, shards=1), art, tmp_path / "out")
    metrics = _assert_equal_runs(res, colocated)
    assert metrics[0]["weak_checkpoint"] and metrics[0]["n_sampled"] > 0
    assert metrics[0]["trunc_error_sampled_max"] < 1e-5  # dense: the sampled error is rounding only
    vocab = load_hf(res.model_dir).config.vocab_size
    assert all(m["pool_reply_bytes_per_token"] == 4 * vocab for m in metrics)  # dense fp32 rows, nothing else


def test_packed_pool_zero3_shards_survive_a_sigkill_and_equal_padded_colocated(ray_cluster, art, colocated,
                                                                              tmp_path):
    """training.packing over the pool: packed [1, L] requests (ids + position_ids, no mask) on a
    ZeRO-3-sharded replica (S = 2) give the padded colocated run's per-step losses and weights,
    with a shard SIGKILLed mid-run (re-formed, the request retried). One run for both claims: a
    pool run costs ~30 s here; padded requests on a sharded replica are checked against the plain
    server in test_group.py, padded requests through Train on R = 2 above."""
    out = tmp_path / "out"
    cfg = _pool_cfg(top_k=0, replicas=1, shards=2, prefetch=1)
    cfg.training.packing = True
    os.environ[POOL_FAULT_ENV] = "0:1:3"  # replica 0, shard 1 dies after its 3rd forward
    try:
        res = _train(cfg, art, out)
    finally:
        del os.environ[POOL_FAULT_ENV]
    assert Path(out, ".pool_fault_injected").exists()  # the kill happened
    _assert_equal_runs(res, colocated)


def test_top_k_pool_error_is_below_the_logged_bound(ray_cluster, art, colocated, tmp_path):
    res = _train(_pool_cfg(top_k=4, prefetch=0, exact_sample=32, error_warn=1e-9), art, tmp_path / "out")
    metrics = read_metrics(res.metrics_path)
    first, ref_first = metrics[0], colocated[1][0]
    assert 0 < first["weak_tail_mass_mean"] <= first["weak_tail_mass_max"] < 1
    assert first["trunc_bound"] > 0 and first["trunc_warning"]
    # step 1 runs on identical strong weights: the loss difference is pure truncation error
    assert abs(first["loss"] - ref_first["loss"]) <= first["trunc_bound"]
    for m in metrics:
        assert m["pool_reply_bytes_per_token"] == 8 * 4 + 8  # k ids + k log-probs + label + tail
        assert m["n_sampled"] > 0 and m["trunc_error_sampled_mean"] <= m["trunc_bound_sampled_mean"]


def test_pool_refuses_joint_mode_and_a_worker_without_the_pool(art, tmp_path):
    from wmss_ray.training.trainer import build_spec
    from wmss_ray.training.worker import PhaseWorker, init_single_process

    cfg = _pool_cfg(top_k=0)
    cfg.scaling.num_workers = 1
    args = (cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"], str(tmp_path))
    with pytest.raises(ValueError, match="frozen weak model only"):
        build_spec(*args, mode="joint")
    spec = build_spec(*args)
    init_single_process()
    with pytest.raises(ValueError, match="pool's replica handles"):
        PhaseWorker(cfg, spec, 0, 1, "cpu")
