"""The sparse-weak mixed CE: dense/top-V equal the frozen chunked loss, top-k equals its naive
reference, the truncation bound holds (random and adversarial cases) and is nearly attained."""

from __future__ import annotations

import math

import pytest
import torch

from tests.losses.mixing_inputs import IGN, assert_close, largest_tensor_numel, leaves, make_inputs
from wmss_ray.losses.mixing import chunked_mixed_ce, sparse_mixed_ce
from wmss_ray.losses.reference import sparse_mixed_ce_naive
from wmss_ray.losses.stats import CE_FIELDS, TRUNCATION_FIELDS
from wmss_ray.losses.weak_side import (
    WeakLogProbs,
    dense_weak_logp,
    truncation_bound,
    truncation_error,
    weak_from_logp,
)


def weak_logp(tensors):
    _, _, hw, ww = tensors
    return torch.log_softmax((hw @ ww.T).float(), dim=-1)


@pytest.mark.parametrize("top_k", [0, "V"])
@pytest.mark.parametrize("masked_every, chunk", [(3, 8), (0, 5), (0, 1024), (4, 37)])
@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0])
def test_dense_and_top_v_equal_frozen_chunked_exactly(top_k, masked_every, chunk, lam):
    tensors, y = make_inputs(masked_every=masked_every)
    v = tensors[1].shape[0]
    ref_in = leaves(tensors, (True, True, False, False))
    ref, ref_stats = chunked_mixed_ce(*ref_in, y, lam, chunk_size=chunk, num_tokens=50, return_stats=True)
    ref.backward()
    weak = weak_from_logp(weak_logp(tensors), y.clamp_min(0), v if top_k == "V" else 0)
    hs, ws = leaves(tensors[:2])
    got, stats = sparse_mixed_ce(hs, ws, weak, y, lam, chunk_size=chunk, num_tokens=50, return_stats=True)
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    assert_close(hs.grad, ref_in[0].grad, rtol=1e-6)
    assert_close(ws.grad, ref_in[1].grad, rtol=1e-6)
    for k in CE_FIELDS:
        assert getattr(stats, k).item() == pytest.approx(getattr(ref_stats, k).item(), rel=1e-6, abs=1e-6), k
    assert stats.trunc_bound_sum.item() == pytest.approx(0.0, abs=1e-6)  # empty tail: exact


@pytest.mark.parametrize("lam", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_equals_its_naive_reference_values_and_grads(lam, k):
    tensors, y = make_inputs(dtype=torch.float64, masked_every=3)
    weak = weak_from_logp(weak_logp(tensors).double(), y.clamp_min(0), k)
    weak = WeakLogProbs(weak.vocab, topk_logp=weak.topk_logp.double(), topk_ids=weak.topk_ids,
                        label_logp=weak.label_logp.double(), tail_logmass=weak.tail_logmass.double())
    hs, ws = leaves(tensors[:2])
    loss, stats = sparse_mixed_ce(hs, ws, weak, y, lam, chunk_size=7, return_stats=True)
    loss.backward()
    rh, rw = leaves(tensors[:2])
    ref = sparse_mixed_ce_naive(rh @ rw.T, weak, y, lam)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert_close(hs.grad, rh.grad, rtol=1e-10)
    assert_close(ws.grad, rw.grad, rtol=1e-10)
    valid = y != IGN
    zs = (tensors[0] @ tensors[1].T)[valid]
    wv = weak.rows(valid.nonzero().squeeze(1))
    assert stats.trunc_bound_sum.item() == pytest.approx(
        truncation_bound(zs, wv, y[valid], lam).sum().item(), rel=1e-9)
    tail = wv.tail_logmass.exp()
    assert stats.tail_mass_sum.item() == pytest.approx(tail.sum().item(), rel=1e-9)
    assert stats.tail_mass_max.item() == pytest.approx(tail.max().item(), rel=1e-12)
    assert all(hasattr(stats, k) for k in TRUNCATION_FIELDS)


def test_reconstruction_keeps_top_k_label_and_total_mass():
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(20, 30, generator=g, dtype=torch.float64) * 3, -1)
    y = torch.randint(0, 30, (20,), generator=g)
    weak = weak_from_logp(logp, y, 4)
    rec = dense_weak_logp(weak, y).double()
    torch.testing.assert_close(rec.exp().sum(1), torch.ones(20, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.equal(rec.gather(1, weak.topk_ids), weak.topk_logp)
    assert torch.equal(rec.gather(1, y[:, None]).squeeze(1), weak.label_logp)
    assert torch.allclose(rec.gather(1, y[:, None]).squeeze(1).double(), logp.gather(1, y[:, None]).squeeze(1), atol=1e-6)


def _random_case(seed, n=64, v=200):
    g = torch.Generator().manual_seed(seed)
    temp_s, temp_w = [float(t) for t in torch.rand(2, generator=g) * 6 + 0.2]
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * temp_s
    logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * temp_w, -1)
    y = torch.randint(0, v, (n,), generator=g)
    return zs, logp, y


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lam", [0.1, 0.42, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_measured_error_is_below_the_bound_on_random_cases(seed, lam, k):
    zs, logp, y = _random_case(seed)
    weak = weak_from_logp(logp, y, k)
    err, bound = truncation_error(zs, weak, logp, y, lam)
    assert (err <= bound + 1e-9).all(), (err - bound).max()
    if lam == 1.0:
        assert err.max() == 0 and bound.max() == 0


def _adversarial(v, lam, k, tail_mass, strong_tail_logit):
    """Both tails on one same token ``v - 1``; the top-k weak ids are 0..k-1, label 0."""
    n = 1
    logp = torch.full((n, v), -60.0, dtype=torch.float64)
    logp[:, :k] = math.log((1 - tail_mass) / k)
    logp[:, v - 1] = math.log(tail_mass)
    logp = torch.log_softmax(logp, -1)
    zs = torch.zeros(n, v, dtype=torch.float64)
    zs[:, v - 1] = strong_tail_logit
    y = torch.zeros(n, dtype=torch.long)
    return zs, logp, y


@pytest.mark.parametrize("lam", [0.3, 0.5, 0.7])
def test_adversarial_cases_stay_below_and_nearly_attain_the_bound(lam):
    """The case the bound's proof makes tight: error / bound -> 1 as the tail grows."""
    ratios = []
    for v in (50, 1000, 20000):
        zs, logp, y = _adversarial(v, lam, k=4, tail_mass=0.5, strong_tail_logit=12.0)
        weak = weak_from_logp(logp, y, 4)
        err, bound = truncation_error(zs, weak, logp, y, lam)
        assert (err <= bound + 1e-9).all()
        ratios.append(float(err / bound))
    assert ratios == sorted(ratios) and ratios[-1] > 0.8, ratios
    # Strong and weak disagree on the tail: still bounded
    for logit in (-20.0, 0.0, 30.0):
        for mass in (1e-6, 0.3, 0.99):
            zs, logp, y = _adversarial(500, lam, 2, mass, logit)
            zs[:, 3] = 25.0  # a strong spike on a different tail token
            err, bound = truncation_error(zs, weak_from_logp(logp, y, 2), logp, y, lam)
            assert (err <= bound + 1e-9).all()


def test_the_issue_bound_with_the_full_strong_sum_is_looser():
    zs, logp, y = _random_case(5)
    weak = weak_from_logp(logp, y, 8)
    lam = 0.5
    tight = truncation_bound(zs, weak, y, lam)
    in_k = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, weak.topk_ids, True).scatter_(1, y[:, None], True)
    w = dense_weak_logp(weak, y)
    log_a = torch.logsumexp((lam * zs + (1 - lam) * w).masked_fill(~in_k, -math.inf), 1)
    issue = torch.nn.functional.softplus(lam * torch.logsumexp(zs, 1) + (1 - lam) * weak.tail_logmass - log_a)
    assert (tight <= issue + 1e-12).all() and (tight < issue).any()


def test_sparse_never_materialises_n_by_v():
    n, v, d, chunk, k = 96, 400, 8, 8, 5
    tensors, y = make_inputs(n=n, d_s=d, d_w=d, v=v, masked_every=0)
    weak = weak_from_logp(weak_logp(tensors), y, k)
    hs, ws = leaves(tensors[:2])

    def run():
        loss, _ = sparse_mixed_ce(hs, ws, weak, y, 0.5, chunk_size=chunk, return_stats=True)
        loss.backward()

    assert largest_tensor_numel(run) <= max(chunk * v, v * d, n * d) < n * v


def test_validation_and_no_valid_rows():
    tensors, y = make_inputs()
    v = tensors[1].shape[0]
    hs, ws = leaves(tensors[:2])
    weak = weak_from_logp(weak_logp(tensors), y.clamp_min(0), 4)
    with pytest.raises(ValueError, match="vocabulary"):
        sparse_mixed_ce(hs, ws, WeakLogProbs(v + 1, dense=torch.zeros(y.shape[0], v + 1)), y, 0.5)
    with pytest.raises(ValueError, match="topk_logp"):
        bad = WeakLogProbs(v, topk_logp=weak.topk_logp[:, :2], topk_ids=weak.topk_ids,
                           label_logp=weak.label_logp, tail_logmass=weak.tail_logmass)
        sparse_mixed_ce(hs, ws, bad, y, 0.5)
    loss, stats = sparse_mixed_ce(hs, ws, weak, torch.full_like(y, IGN), 0.5, return_stats=True)
    loss.backward()
    assert loss.item() == 0 and hs.grad.abs().max() == 0 and stats.trunc_bound_sum.item() == 0


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_bf16_within_bf16_tolerance_of_fp64_naive(top_k, lam):
    """bf16 strong GEMMs + fp32 weak log-probs, softmax and accumulation vs the fp64 naive loss
    on the same (bf16-rounded) strong inputs and the same weak log-probs."""
    tensors, y = make_inputs(n=300, d_s=64, d_w=48, v=1000, masked_every=4, seed=3)
    hs16, ws16 = (t.bfloat16() for t in tensors[:2])
    weak = weak_from_logp(weak_logp(tensors), y.clamp_min(0), top_k)
    rh, rw = leaves([hs16.double(), ws16.double()])
    weak64 = WeakLogProbs(weak.vocab, **{k: (getattr(weak, k).double() if k != "topk_ids" else weak.topk_ids)
                                         for k in ("dense", "topk_logp", "topk_ids", "label_logp", "tail_logmass")
                                         if getattr(weak, k) is not None})
    ref = sparse_mixed_ce_naive(rh @ rw.T, weak64, y, lam)
    ref.backward()
    hs, ws = leaves([hs16, ws16])
    loss, stats = sparse_mixed_ce(hs, ws, weak, y, lam, chunk_size=64, return_stats=True)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=4e-3)
    assert stats.ce_mix_sum.item() / int((y != IGN).sum()) == pytest.approx(ref.item(), rel=4e-3)
    loss.backward()
    for t, r in ((hs, rh.grad), (ws, rw.grad)):
        assert t.grad.dtype == torch.bfloat16
        err = (t.grad.double() - r).abs().max() / r.abs().max()
        assert err < 2e-2, err  # bf16 has 8 mantissa bits: 2^-8 = 3.9e-3 per rounding
    if top_k and lam != 1.0:  # the bound from bf16 logits agrees with the fp64 one
        valid = (y != IGN).nonzero().squeeze(1)
        bound = truncation_bound((rh @ rw.T).detach()[valid], weak64.rows(valid), y[valid], lam).sum()
        assert stats.trunc_bound_sum.item() == pytest.approx(bound.item(), rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k, masked_every", [(0, 0), (0, 3), (5, 0), (5, 3)])
@pytest.mark.parametrize("stats", [False, True])
def test_one_chunk_buffer_and_no_other_chunk_sized_temporary(dtype, top_k, masked_every, stats):
    """As chunked_mixed_ce: the only [chunk, V]-sized allocation is the one fp32 buffer (dense weak
    rows are sliced, or gathered in row blocks when some rows are ignored)."""
    from tests.losses.mixing_inputs import assert_one_chunk_buffer, fresh_allocations

    n, v, d, chunk = 256, 512, 8, 64
    tensors, y = make_inputs(n=n, d_s=d, d_w=d, v=v, masked_every=masked_every)
    weak = weak_from_logp(weak_logp(tensors), y.clamp_min(0), top_k)
    hs, ws = leaves([t.to(dtype) for t in tensors[:2]])

    def step():
        out = sparse_mixed_ce(hs, ws, weak, y, 0.5, chunk_size=chunk, return_stats=stats)
        (out[0] if stats else out).backward()

    assert_one_chunk_buffer(fresh_allocations(step), n, v, d, chunk)


def test_chunk_from_budget_equals_explicit_chunk():
    from wmss_ray.losses.mixing import chunk_rows_for

    tensors, y = make_inputs(n=300, d_s=16, d_w=12, v=2048, masked_every=0)
    weak = weak_from_logp(weak_logp(tensors), y, 7)
    rows = chunk_rows_for(300, 2048, 0.5)  # 0.5 MiB / 8 KiB per row = 64 rows
    a, b = leaves(tensors[:2]), leaves(tensors[:2])
    la = sparse_mixed_ce(*a, weak, y, 0.5, chunk_mb=0.5)
    lb = sparse_mixed_ce(*b, weak, y, 0.5, chunk_size=rows)
    assert rows == 64 and torch.equal(la, lb)
    la.backward()
    lb.backward()
    for s, t in zip(a, b):
        assert torch.equal(s.grad, t.grad)
