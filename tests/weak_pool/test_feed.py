"""``PooledWeakSide`` without Ray: a Train worker's pool side over an in-process WeakServer.

The step trains on the very micro-batches its requests were built from (read once per step,
dropped once the step has run), and with ``top_k: 0`` its loss and statistics equal the
colocated frozen ``PairLM``'s on the same batch; a packed micro-batch (``training.packing``)
through the pool side gives the padded micro-batch's loss and statistics. The step (strong
forward, loss, statistics) is the worker's; :func:`_pool_forward` does what ``PhaseWorker`` does.
"""

from __future__ import annotations

import torch

from tests.weak_pool.rows import RowsById
from tests.weak_pool.test_server import _InProcessClient
from wmss_ray.losses.stats import CE_FIELDS, LossStats
from wmss_ray.training.metrics import is_log_step, pool_metrics
from wmss_ray.training.pair import PairLM
from wmss_ray.weak_pool.feed import PooledWeakSide
from wmss_ray.weak_pool.server import WeakServer
from wmss_ray.weak_pool.wire import WeakRequest

STEPS, ACCUM = 3, 2


def _ids(step, a, per=2):
    return [f"s{(2 * per * step + per * a + j):04d}" for j in range(per)]


def _side(art, top_k, prefetch, reads, packed=False, per=2):
    rows = RowsById(art["tokenized"])

    def read_step(step):
        reads.append(step)
        return [rows.packed(_ids(step, a, per)) if packed else rows.batch(_ids(step, a, per), pad_id=0)
                for a in range(ACCUM)]

    client = _InProcessClient(WeakServer(art["weak"], top_k=top_k))
    side = PooledWeakSide(client, read_step, ACCUM, STEPS, is_logged=lambda step: is_log_step(step + 1, 2, STEPS),
                          prefetch=prefetch, exact_sample=3, device="cpu")
    return side, client


def _pool_forward(side, pooled, b, step, a, acc: LossStats, num_tokens, loss_scale):
    """``PhaseWorker._forward`` of the pool placement: the reply, the strong forward, the stats."""
    reply = side.reply(step, a)
    loss, stats = pooled(b["input_ids"], b.get("attention_mask"), b["labels"], num_tokens=num_tokens,
                         loss_scale=loss_scale, position_ids=b.get("position_ids"), weak_logp=reply.weak,
                         exact=reply.exact)
    stats.add_pool_reply(reply.nbytes, reply.wait_s)
    acc.add_(stats)
    return loss, stats


def _ce(stats: LossStats) -> torch.Tensor:
    return torch.stack([getattr(stats, k) for k in CE_FIELDS])


def _metrics(side, acc: LossStats) -> dict:
    return pool_metrics(acc, side.checkpoint_id, warn_above=0.01)


def _pairs(art):
    from wmss_ray.models.loading import load_causal_lm

    strong, weak = (load_causal_lm(art[k], dtype="float32") for k in ("strong", "weak"))
    pooled = PairLM(strong, None, "frozen", 0.5, chunk_size=5, weak_pool=True)
    colocated = PairLM(strong, weak, "frozen", 0.5, chunk_size=5)
    return pooled, colocated


def test_dense_pool_side_equals_colocated_and_trains_on_the_requested_batches(tmp_path):
    from tests.training.test_training_units import make_artifacts

    art = make_artifacts(tmp_path)
    reads: list[int] = []
    side, client = _side(art, top_k=0, prefetch=3, reads=reads)
    pooled, colocated = _pairs(art)
    for step in range(STEPS):
        mbs = side.micro_batches(step)
        acc = LossStats.zeros()
        assert set(side._steps) <= set(range(step, STEPS))  # consumed steps dropped
        for a, b in enumerate(mbs):
            with torch.no_grad():
                loss, vec = _pool_forward(side, pooled, b, step, a, acc, num_tokens=40.0, loss_scale=1.0)
                ref_loss, ref_vec = colocated(b["input_ids"], b["attention_mask"], b["labels"], num_tokens=40.0)
            torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(_ce(vec), _ce(ref_vec), atol=1e-6, rtol=1e-6)
            req = client.sent[step * ACCUM + a]  # the request of this micro-batch: built from b itself
            assert torch.equal(torch.from_numpy(req.input_ids).long(), b["input_ids"])
        metrics = _metrics(side, acc)
        assert metrics["trunc_bound"] == 0 and metrics["weak_checkpoint"] == client.server.checkpoint_id
        assert ("n_sampled" in metrics) == (step + 1 in (1, 2, STEPS))  # logged steps: first, every 2nd, last
    assert reads == list(range(STEPS))  # each step read once, although requests ran ahead of it


def test_top_k_side_accumulates_the_truncation_metrics(tmp_path):
    from tests.training.test_training_units import make_artifacts

    art = make_artifacts(tmp_path)
    side, _ = _side(art, top_k=4, prefetch=0, reads=[])
    pooled, _ = _pairs(art)
    mbs = side.micro_batches(0)
    acc = LossStats.zeros()
    for a, b in enumerate(mbs):
        with torch.no_grad():
            _pool_forward(side, pooled, b, 0, a, acc, num_tokens=40.0, loss_scale=1.0)
    metrics = _metrics(side, acc)
    assert 0 < metrics["weak_tail_mass_mean"] <= metrics["weak_tail_mass_max"] < 1
    assert metrics["trunc_bound"] > 0 and metrics["trunc_warning"]  # above error_warn = 0.01
    assert metrics["n_sampled"] == 3 and metrics["trunc_error_sampled_mean"] <= metrics["trunc_bound_sampled_mean"]
    assert metrics["pool_reply_bytes_per_token"] == 8 * 4 + 8
    assert WeakRequest.from_batch(mbs[0]).labels.size > 0


def test_packed_pool_side_equals_padded_colocated(tmp_path):
    """The exactness claim for ``training.packing`` over the pool: per micro-batch, the packed rows
    through the pool side (top_k 0) give the loss and statistics of the same rows padded through
    the colocated frozen PairLM (fp32, 1e-5)."""
    from tests.training.test_training_units import make_artifacts

    art = make_artifacts(tmp_path)
    side, client = _side(art, top_k=0, prefetch=2, reads=[], packed=True, per=3)
    pooled, colocated = _pairs(art)
    rows = RowsById(art["tokenized"])
    for step in range(STEPS):
        acc = LossStats.zeros()
        for a, b in enumerate(side.micro_batches(step)):
            assert b["input_ids"].shape[0] == 1 and "attention_mask" not in b  # really packed
            padded = rows.batch(_ids(step, a, 3), pad_id=0)
            with torch.no_grad():
                loss, vec = _pool_forward(side, pooled, b, step, a, acc, num_tokens=40.0, loss_scale=1.0)
                ref_loss, ref_vec = colocated(padded["input_ids"], padded["attention_mask"], padded["labels"],
                                              num_tokens=40.0)
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
            torch.testing.assert_close(_ce(vec), _ce(ref_vec), atol=1e-5, rtol=0)
            req = client.sent[step * ACCUM + a]
            assert req.packed and torch.equal(torch.from_numpy(req.position_ids).long(), b["position_ids"])
        metrics = _metrics(side, acc)
        assert metrics["trunc_bound"] == 0 and metrics["pool_reply_bytes_per_token"] == 4 * client.server.vocab
