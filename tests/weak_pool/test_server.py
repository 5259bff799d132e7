"""WeakServer and the wire without Ray: replies equal the model's own log-probs at the answer
positions, sizes are exactly as specified, and the reconstruction gives back the exact loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.test_training_units import make_artifacts
from tests.weak_pool.rows import RowsById, assert_same_reply
from wmss_ray.losses.weak_side import dense_weak_logp
from wmss_ray.weak_pool.server import WeakServer, checkpoint_id
from wmss_ray.weak_pool.wire import WeakRequest, reply_bytes, request_bytes


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("pool_server"))


def _batch(art, n=4):
    rows = RowsById.from_parquet(art["tokenized"])
    return rows.batch([f"s{i:04d}" for i in range(n)], pad_id=0)


def _reference_logp(art, batch):
    """The weak model's full log-probs at the answer positions ``[N, V]`` and their labels."""
    from wmss_ray.models.loading import load_causal_lm

    model = load_causal_lm(art["weak"], dtype="float32")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    sel = batch["labels"][:, 1:] != -100
    return torch.log_softmax(logits[sel], -1), batch["labels"][:, 1:][sel]


@pytest.mark.parametrize("top_k", [0, 1, 8])
def test_reply_holds_the_weak_log_probs_of_the_answer_positions(art, top_k):
    batch = _batch(art)
    ref, labels = _reference_logp(art, batch)
    server = WeakServer(art["weak"], top_k=top_k, chunk_size=7)
    req = WeakRequest.from_batch(batch, n_exact=5)
    reply = server.answer(req)
    n, v = ref.shape
    assert reply.n_positions == n and reply.vocab == v and reply.checkpoint_id == checkpoint_id(art["weak"])
    assert np.array_equal(req.labels, labels.numpy().astype(np.int32))
    # exact sizes: 8k + 8 bytes per answer position (dense: 4V), exact rows 4V each
    assert reply.nbytes == reply_bytes(n, top_k, v, n_exact=5)
    assert reply.nbytes == n * (4 * v if top_k == 0 else 8 * top_k + 8) + 5 * 4 * v
    b, t = batch["input_ids"].shape
    assert req.nbytes == request_bytes(b, t, n, 5) == 4 * b * t + 4 * b + 8 * n + 4 * 5
    weak = reply.to_weak()
    torch.testing.assert_close(reply.exact(), ref[torch.from_numpy(req.exact_rows).long()], atol=1e-5, rtol=0)
    if top_k == 0:
        assert reply.topk_ids is None
        torch.testing.assert_close(weak.dense, ref, atol=1e-5, rtol=0)
        return
    assert reply.topk_ids.dtype == np.int32 and reply.topk_logp.dtype == np.float32
    vals, ids = ref.topk(top_k, dim=1)
    torch.testing.assert_close(weak.topk_logp, vals, atol=1e-5, rtol=0)
    torch.testing.assert_close(weak.label_logp, ref.gather(1, labels[:, None]).squeeze(1), atol=1e-5, rtol=0)
    keep = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ids, True).scatter_(1, labels[:, None], True)
    torch.testing.assert_close(weak.tail_logmass, torch.logsumexp(ref.masked_fill(keep, -float("inf")), 1),
                               atol=1e-5, rtol=0)
    rec = dense_weak_logp(weak, labels)
    torch.testing.assert_close(rec.exp().sum(1), torch.ones(n), atol=1e-5, rtol=0)


def test_empty_answer_and_bad_padding(art):
    batch = _batch(art, 2)
    batch["labels"][:] = -100
    reply = WeakServer(art["weak"], top_k=4).answer(WeakRequest.from_batch(batch, n_exact=3))
    assert reply.n_positions == 0 and reply.nbytes == 0 and reply.exact_logp is None
    batch["attention_mask"][0, 0] = 0  # left padding: refused, not silently misread
    with pytest.raises(ValueError, match="right-padded"):
        WeakRequest.from_batch(batch)


@pytest.mark.parametrize("top_k", [0, 8])
def test_packed_request_round_trips_and_answers_like_the_padded_one(art, top_k):
    """A packed micro-batch travels as ids + position_ids [1, L] (no mask, no lengths) and gets the
    padded micro-batch's reply for the same rows: same answer positions, same log-probs."""
    rows = RowsById.from_parquet(art["tokenized"])
    ids = [f"s{i:04d}" for i in range(4)]
    padded, packed = rows.batch(ids, pad_id=0), rows.packed(ids)
    req, ref_req = WeakRequest.from_batch(packed, n_exact=5), WeakRequest.from_batch(padded, n_exact=5)
    assert req.packed and not ref_req.packed and req.lengths is None
    assert req.input_ids.dtype == req.position_ids.dtype == np.int32
    assert np.array_equal(req.input_ids, packed["input_ids"].numpy()) and req.input_ids.shape == (1, packed["input_ids"].shape[1])
    assert np.array_equal(req.position_ids, packed["position_ids"].numpy())
    assert np.array_equal(req.labels, ref_req.labels) and np.array_equal(req.exact_rows, ref_req.exact_rows)
    n, length = len(req.labels), req.input_ids.shape[1]
    assert length == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()  # no pad travels
    assert req.nbytes == request_bytes(1, length, n, 5, packed=True) == 8 * length + 8 * n + 4 * 5
    server = WeakServer(art["weak"], top_k=top_k, chunk_size=7)
    reply, ref = server.answer(req), server.answer(ref_req)
    assert reply.nbytes == ref.nbytes == reply_bytes(n, top_k, reply.vocab, n_exact=5)
    assert_same_reply(reply, ref)


def test_packed_request_on_a_varlen_kernel_answers_like_the_padded_one(art):
    """A packed request reaches a varlen kernel with its rows' boundaries (read from the wire's
    position_ids on the host) in every layer, and the reply equals the padded request's (sdpa)."""
    from tests.models import varlen_reference as ref

    rows = RowsById.from_parquet(art["tokenized"])
    ids = [f"s{i:04d}" for i in range(4)]
    req = WeakRequest.from_batch(rows.packed(ids), n_exact=3)
    ref_req = WeakRequest.from_batch(rows.batch(ids, pad_id=0), n_exact=3)
    want = WeakServer(art["weak"], top_k=8, chunk_size=7).answer(ref_req)
    server = WeakServer(art["weak"], top_k=8, chunk_size=7)
    ref.use_on(server.model)
    ref.CALLS.clear()
    got = server.answer(req)
    assert ref.CALLS == list(range(server.model.config.num_hidden_layers))
    for a, b in zip(got.arrays, want.arrays):
        if a.dtype == np.int32:
            assert np.array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bad_packed_batches_are_refused(art):
    rows = RowsById.from_parquet(art["tokenized"])
    packed = rows.packed(["s0000", "s0001"])
    with pytest.raises(ValueError, match="got both"):
        WeakRequest.from_batch({**packed, "attention_mask": torch.ones_like(packed["input_ids"])})
    with pytest.raises(ValueError, match=r"\[1, L\]"):
        WeakRequest.from_batch({k: packed[k].repeat(2, 1) for k in ("input_ids", "position_ids", "labels")})
    bad = packed["position_ids"].clone()
    bad[0, 3] += 5  # neither + 1 nor a restart at 0
    with pytest.raises(ValueError, match="restart at 0"):
        WeakRequest.from_batch({**packed, "position_ids": bad})


def test_zero3_shard_loads_partitioned_and_answers_like_the_plain_server(art, monkeypatch):
    """A ZeRO-3 shard builds its weak model under zero.Init (transformers' whole-model
    from_pretrained is never called: no shard holds the full model on its host) and its replies
    equal the plain server's. One process (W = 1) with every parameter partitioned: the
    multi-shard replica is checked against the plain server in test_group.py."""
    import transformers

    from wmss_ray.training.worker import init_single_process

    init_single_process()
    req = WeakRequest.from_batch(_batch(art), n_exact=3)
    plain = WeakServer(art["weak"], top_k=4, chunk_size=7)
    want = plain.answer(req)

    def whole_model(*args, **kwargs):
        raise AssertionError("a ZeRO-3 shard loaded the whole model with from_pretrained")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", whole_model)
    shard = WeakServer(art["weak"], top_k=4, chunk_size=7, zero3=True,
                       ds_overrides={"stage3_param_persistence_threshold": 0})
    assert shard.vocab == plain.vocab and shard.held_numel() == plain.held_numel()  # W = 1 holds all of it
    assert all(hasattr(p, "ds_id") for p in shard.model.parameters())
    got = shard.answer(req)
    for a, b in zip(got.arrays, want.arrays):
        if a.dtype == np.int32:
            assert np.array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_byte_arithmetic_at_qwen_vocab():
    per_token_bf16 = 2 * 151_936
    assert reply_bytes(1, 64, 151_936) == 520
    assert per_token_bf16 / reply_bytes(1, 64, 151_936) > 500


class _InProcessClient:
    """PoolClient's interface over a real WeakServer in this process (records what is in flight)."""

    def __init__(self, server):
        self.server, self.sent, self.in_flight, self.max_in_flight = server, [], 0, 0

    def submit(self, req):
        self.sent.append(req)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return self.server.answer(req)

    def get(self, reply):
        self.in_flight -= 1
        return reply


@pytest.mark.parametrize("prefetch", [0, 2])
def test_feed_prefetches_each_micro_batch_once_with_bounded_back_pressure(art, prefetch):
    from wmss_ray.weak_pool.feed import WeakFeed

    rows = RowsById.from_parquet(art["tokenized"])
    batches = {(s, a): rows.batch([f"s{(4 * s + 2 * a + j):04d}" for j in range(2)], pad_id=0)
               for s in range(3) for a in range(2)}
    client = _InProcessClient(WeakServer(art["weak"], top_k=3))
    built = []

    def batch(step, a):
        built.append((step, a))
        return batches[(step, a)]

    feed = WeakFeed(client, batch, grad_accum=2, end_step=3, prefetch=prefetch, n_exact=lambda s, a: 2 if a == 0 else 0)
    for step in range(3):
        for a in range(2):
            reply = feed.get(step, a, "cpu")
            weak, exact, nbytes = reply.weak, reply.exact, reply.nbytes
            req = WeakRequest.from_batch(batches[(step, a)])
            assert weak.label_logp.shape == (len(req.labels),) and nbytes == reply_bytes(len(req.labels), 3, weak.vocab)
            assert (exact is not None) == (a == 0)
    assert built == sorted(batches)  # each micro-batch requested once, in training order
    assert client.max_in_flight == prefetch + 1 and len(client.sent) == 6
    assert feed.bytes_received == sum(reply_bytes(len(WeakRequest.from_batch(b).labels), 3, weak.vocab)
                                      for b in batches.values())
