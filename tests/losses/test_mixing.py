"""The mixed-logit CE: gradient formula, sanity identities (DESIGN.md §1.4), chunked == naive.
Memory, precision and the chunk budget: tests/losses/test_mixing_memory.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tests.losses.mixing_inputs import IGN, assert_close, leaves, make_inputs, naive_reference
from wmss_ray.losses.mixing import chunked_mixed_ce, sparse_mixed_ce
from wmss_ray.losses.reference import mix_logits, mixed_ce_naive
from wmss_ray.losses.stats import CE_FIELDS, LossStats
from wmss_ray.losses.weak_side import weak_from_logp

@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_naive_gradient_is_lam_times_softmax_minus_onehot(lam):
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(11, 7, generator=g, dtype=torch.float64, requires_grad=True)
    zw = torch.randn(11, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (11,), generator=g)
    y[[2, 5]] = IGN
    valid = y != IGN
    gs, gw = torch.autograd.grad(mixed_ce_naive(zs, zw, y, lam), (zs, zw))
    base = torch.softmax(mix_logits(zs, zw, lam), dim=-1).detach()
    base[valid] -= F.one_hot(y[valid], 7).double()
    base[~valid] = 0.0
    base /= int(valid.sum())
    torch.testing.assert_close(gs, lam * base)
    torch.testing.assert_close(gw, (1 - lam) * base)


def test_lam_one_is_plain_cross_entropy():
    (hs, ws, hw, ww), y = make_inputs(dtype=torch.float64)
    zs, zw = hs @ ws.T, hw @ ww.T
    ref = F.cross_entropy(zs, y, ignore_index=IGN)
    torch.testing.assert_close(mixed_ce_naive(zs, zw, y, 1.0), ref)
    torch.testing.assert_close(mixed_ce_naive(zs, None, y, 1.0), ref)
    # chunked: the weak side may be absent; gradients equal plain CE's.
    a, b = leaves([hs, ws]), leaves([hs, ws])
    loss = chunked_mixed_ce(a[0], a[1], None, None, y, 1.0, chunk_size=8)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    F.cross_entropy(b[0] @ b[1].T, y, ignore_index=IGN).backward()
    for x, r in zip(a, b):
        torch.testing.assert_close(x.grad, r.grad)


def test_weak_logprobs_may_replace_weak_logits():
    (hs, ws, hw, ww), y = make_inputs(dtype=torch.float64)
    zs, zw = hs @ ws.T, hw @ ww.T
    ref = mixed_ce_naive(zs, zw, y, 0.4)
    shift = torch.randn(zw.shape[0], 1, dtype=torch.float64) * 10
    torch.testing.assert_close(mixed_ce_naive(zs, torch.log_softmax(zw, -1), y, 0.4), ref)
    torch.testing.assert_close(mixed_ce_naive(zs, zw + shift, y, 0.4), ref)


@pytest.mark.parametrize("chunk", [8, 37, 64])
@pytest.mark.parametrize("masked_every", [0, 3])
@pytest.mark.parametrize("lam", [0.0, 0.42, 0.9])
def test_chunked_equals_naive_value_and_all_gradients(chunk, masked_every, lam):
    tensors, y = make_inputs(n=37, d_s=16, d_w=12, masked_every=masked_every)
    ref_loss, ref_grads = naive_reference(tensors, y, lam)
    x = leaves(tensors)
    loss = chunked_mixed_ce(*x[:2], *x[2:], y, lam, chunk_size=chunk)
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), ref_loss)
    loss.backward()
    for t, r in zip(x, ref_grads):
        assert t.grad.dtype == torch.float32
        assert_close(t.grad, r)


@pytest.mark.parametrize("lam", [1.0, 0.42])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_smoothing_equals_torch_cross_entropy_on_the_mixed_logits(lam, dtype):
    """``label_smoothing`` (the SFT label-smoothing control; lam = 1) in the chunked loop equals
    ``F.cross_entropy(z_mix, y, label_smoothing=eps)`` in value and all four gradients, masked rows
    and several chunks included, on the hidden-state and the log-prob weak side alike; the stats
    keep the plain mixed CE."""
    eps = 0.1
    tensors, y = make_inputs(n=37, d_s=16, d_w=12, masked_every=3, dtype=dtype)
    hs, ws, hw, ww = leaves([t.double() for t in tensors])
    ref = mixed_ce_naive(hs @ ws.T, hw @ ww.T, y, lam, label_smoothing=eps)
    ref_grads = torch.autograd.grad(ref, (hs, ws, hw, ww))
    x = leaves(tensors, (True, True, lam != 1.0, lam != 1.0))
    loss, stats = chunked_mixed_ce(*x, y, lam, chunk_size=8, label_smoothing=eps, return_stats=True)
    loss.backward()
    rtol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close(loss.detach(), ref.detach(), rtol)
    for t, r in zip(x, ref_grads):
        if t.requires_grad:
            assert_close(t.grad, r, rtol)
    plain = mixed_ce_naive(hs @ ws.T, hw @ ww.T, y, lam).detach()
    assert abs(float(stats.ce_mix_sum) / float(stats.n_tokens) - float(plain)) < 1e-4 * (1 if rtol < 1e-3 else 100)
    # the log-prob weak side (the pool's path) smooths the same way
    logq = torch.log_softmax((tensors[2] @ tensors[3].T).float(), -1)
    ws_leaf = leaves(tensors[:2])
    sparse = sparse_mixed_ce(*ws_leaf, weak_from_logp(logq, y.clamp_min(0), 0), y, lam, chunk_size=8,
                             label_smoothing=eps)
    ref_sparse = mixed_ce_naive(tensors[0].double() @ tensors[1].double().T, logq.double(), y, lam,
                                label_smoothing=eps)
    assert_close(sparse.detach(), ref_sparse, rtol)


def test_frozen_weak_gives_same_strong_grads_and_no_weak_grad_work():
    tensors, y = make_inputs()
    joint, frozen = leaves(tensors), leaves(tensors, (True, True, False, False))
    chunked_mixed_ce(*joint, y, 0.5, chunk_size=8).backward()

    class CountMatmuls(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("mm", "addmm_", "addmm"):
                CountMatmuls.n += 1
            return func(*args, **(kwargs or {}))

    with CountMatmuls():
        loss = chunked_mixed_ce(*frozen, y, 0.5, chunk_size=8)
    loss.backward()
    n_chunks = -(-int((y != IGN).sum()) // 8)
    # Per chunk: 2 forward matmuls (one per side) + 2 for the strong side's gradients only.
    assert CountMatmuls.n == 4 * n_chunks
    assert frozen[2].grad is None and frozen[3].grad is None
    for a, b in zip(joint[:2], frozen[:2]):
        torch.testing.assert_close(a.grad, b.grad)


def test_all_masked_gives_zero_loss_and_zero_grads():
    tensors, y = make_inputs()
    y = torch.full_like(y, IGN)
    x = leaves(tensors)
    loss = chunked_mixed_ce(*x, y, 0.5, chunk_size=8)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for t in x:
        assert torch.equal(t.grad, torch.zeros_like(t))
    zs = torch.randn(5, 9, requires_grad=True)
    naive = mixed_ce_naive(zs, torch.randn(5, 9), torch.full((5,), IGN), 0.5)
    naive.backward()
    assert naive.item() == 0.0 and torch.equal(zs.grad, torch.zeros_like(zs))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_rank_and_microbatch_split_invariance(as_tensor):
    """Each part divides by the global token count; summed losses and grads equal the whole."""
    tensors, y = make_inputs(n=40)
    ref_loss, ref_grads = naive_reference(tensors, y, 0.5)
    total = int((y != IGN).sum())
    num_tokens = torch.tensor(total) if as_tensor else total
    x = leaves(tensors)
    loss_sum = 0.0
    # Uneven split, and a third part with no answer tokens at all (a prompt-only micro-batch).
    y_parts = [y[:13], y[13:], torch.full((4,), IGN)]
    for rows, yp in zip([slice(0, 13), slice(13, 40), slice(0, 4)], y_parts):
        part = chunked_mixed_ce(
            x[0][rows], x[1], x[2][rows], x[3], yp, 0.5, chunk_size=8, num_tokens=num_tokens
        )
        part.backward()
        loss_sum += part.item()
    assert loss_sum == pytest.approx(ref_loss.item(), rel=1e-5)
    for t, r in zip(x, ref_grads):
        assert_close(t.grad, r)


def test_bf16_inputs():
    tensors, y = make_inputs(d_s=32, d_w=24, v=64)
    ref_loss, ref_grads = naive_reference(tensors, y, 0.5)
    x = leaves([t.bfloat16() for t in tensors])
    loss = chunked_mixed_ce(*x, y, 0.5, chunk_size=8)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    loss.backward()
    for t, r in zip(x, ref_grads):
        assert t.grad.dtype == torch.bfloat16
        assert_close(t.grad, r, rtol=5e-2)


def test_return_stats_match_naive_sums():
    tensors, y = make_inputs(dtype=torch.float64)
    lam = 0.3
    loss, stats = chunked_mixed_ce(*leaves(tensors), y, lam, chunk_size=8, return_stats=True)
    assert isinstance(stats, LossStats)
    assert all(getattr(stats, k).item() == 0 for k in set(LossStats._fields) - set(CE_FIELDS))
    hs, ws, hw, ww = tensors
    valid = y != IGN
    zs, zm = (hs @ ws.T)[valid], mix_logits(hs @ ws.T, hw @ ww.T, lam)[valid]
    yv = y[valid]
    p_s = torch.softmax(zs, -1).gather(1, yv[:, None]).squeeze(1)
    p_m = torch.softmax(zm, -1).gather(1, yv[:, None]).squeeze(1)
    expected = {
        "ce_mix_sum": F.cross_entropy(zm, yv, reduction="sum"),
        "ce_strong_sum": F.cross_entropy(zs, yv, reduction="sum"),
        "p_mix_sum": p_m.sum(),
        "p_strong_sum": p_s.sum(),
        "nontarget_grad_mix_sum": (lam * (1 - p_m)).sum(),
        "nontarget_grad_strong_sum": (1 - p_s).sum(),
    }
    for k, v in expected.items():
        assert not getattr(stats, k).requires_grad
        assert getattr(stats, k).item() == pytest.approx(v.item(), rel=1e-9), k
    assert stats.n_tokens.item() == int(valid.sum())
    assert loss.item() == pytest.approx(stats.ce_mix_sum.item() / int(valid.sum()), rel=1e-12)


def test_no_grad_path_and_grad_output_scaling():
    tensors, y = make_inputs()
    with torch.no_grad():
        plain = chunked_mixed_ce(*leaves(tensors), y, 0.5, chunk_size=8)
    assert plain.grad_fn is None
    a, b = leaves(tensors), leaves(tensors)
    chunked_mixed_ce(*a, y, 0.5, chunk_size=8).backward()
    loss = chunked_mixed_ce(*b, y, 0.5, chunk_size=8)
    torch.testing.assert_close(loss.detach(), plain)
    (3.0 * loss).backward()
    for s, t in zip(a, b):
        torch.testing.assert_close(3.0 * s.grad, t.grad)


def test_second_backward_raises_clearly():
    tensors, y = make_inputs()
    loss = chunked_mixed_ce(*leaves(tensors), y, 0.5, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_argument_validation():
    (hs, ws, hw, ww), y = make_inputs()
    with pytest.raises(ValueError, match="lam"):
        chunked_mixed_ce(hs, ws, hw, ww, y, 1.5)
    with pytest.raises(ValueError, match="lam != 1"):
        chunked_mixed_ce(hs, ws, None, None, y, 0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_mixed_ce(hs, ws, hw, ww[:-1], y, 0.5)
    with pytest.raises(ValueError, match="labels"):
        chunked_mixed_ce(hs, ws, hw, ww, y[:-1], 0.5)
    with pytest.raises(ValueError, match="num_tokens"):
        chunked_mixed_ce(hs, ws, hw, ww, y, 0.5, num_tokens=0)
