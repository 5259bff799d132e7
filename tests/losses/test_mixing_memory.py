"""The mixed-logit CE's memory and precision: no full ``[N, V]`` logits, exactly one fp32
``[chunk, V]`` buffer (bf16 widened and narrowed in place in it), bf16 within bf16 tolerance of
float64, and the chunk size from a MiB budget. Its math: tests/losses/test_mixing.py."""

from __future__ import annotations

import pytest
import torch

from tests.losses.mixing_inputs import (
    IGN,
    assert_one_chunk_buffer,
    fresh_allocations,
    largest_tensor_numel,
    leaves,
    make_inputs,
    naive_reference,
)
from wmss_ray.losses.chunk_ops import expand_in_place, narrow_in_place
from wmss_ray.losses.mixing import CHUNK_ROW_MULTIPLE, chunk_rows_for, chunked_mixed_ce

def test_never_materialises_full_logits():
    """No op output is bigger than one [chunk, V] buffer or one gradient (N*V is far bigger)."""
    n, v, d, chunk = 96, 400, 8, 8
    tensors, y = make_inputs(n=n, d_s=d, d_w=d, v=v, masked_every=0)
    x = leaves(tensors)

    biggest = largest_tensor_numel(lambda: chunked_mixed_ce(*x, y, 0.5, chunk_size=chunk).backward())
    assert biggest <= max(chunk * v, v * d, n * d) < n * v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 1001])
def test_in_place_widen_and_narrow_are_exact(dtype, n):
    g = torch.Generator().manual_seed(n)
    vals = torch.randn(n, generator=g).to(dtype)
    buf32 = torch.full((n,), float("nan"))
    buf16 = buf32.view(dtype)
    buf16[:n].copy_(vals)
    expand_in_place(buf32, buf16, n)
    assert torch.equal(buf32, vals.float())
    narrow_in_place(buf32, buf16, n)
    assert torch.equal(buf16[:n], vals)


@pytest.mark.parametrize("lam", [0.3, 1.0])
@pytest.mark.parametrize("frozen", [False, True])
def test_bf16_within_bf16_tolerance_of_fp64(lam, frozen):
    """bf16 GEMMs + fp32 softmax/accumulation vs fp64 on the same (bf16-rounded) inputs."""
    tensors, y = make_inputs(n=300, d_s=64, d_w=48, v=1000, masked_every=4, seed=3)
    tensors = [t.bfloat16() for t in tensors]  # the reference sees exactly these values
    ref_loss, ref_grads = naive_reference(tensors, y, lam)
    x = leaves(tensors, (True, True, not frozen, not frozen))
    loss, stats = chunked_mixed_ce(*x, y, lam, chunk_size=64, return_stats=True)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=4e-3)
    n = int((y != IGN).sum())
    assert stats.ce_mix_sum.item() / n == pytest.approx(ref_loss.item(), rel=4e-3)
    loss.backward()
    trained = (True, True, not frozen and lam != 1.0, not frozen and lam != 1.0)  # lam=1: no weak side
    for t, r, need in zip(x, ref_grads, trained):
        if not need:
            assert t.grad is None
            continue
        assert t.grad.dtype == torch.bfloat16
        err = (t.grad.double() - r).abs().max() / r.abs().max()
        assert err < 2e-2, err  # bf16 has 8 mantissa bits: 2^-8 = 3.9e-3 per rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stats", [False, True])
def test_one_chunk_buffer_and_no_other_chunk_sized_temporary(dtype, stats):
    """The only allocation of [chunk, V] size is the fp32 buffer; the rest are gradients or small."""
    n, v, d, chunk = 256, 512, 8, 64
    tensors, y = make_inputs(n=n, d_s=d, d_w=d, v=v, masked_every=0, dtype=dtype)
    x = leaves(tensors)

    def step():
        out = chunked_mixed_ce(*x, y, 0.5, chunk_size=chunk, return_stats=stats)
        (out[0] if stats else out).backward()

    big = assert_one_chunk_buffer(fresh_allocations(step), n, v, d, chunk)
    assert max(a[2] for a in big) <= max(4 * chunk * v, 4 * v * d, 4 * n * d)


def test_chunk_rows_for_budget_rounding_and_balance():
    v = 151_936
    assert chunk_rows_for(10_000, v, 128) == 192  # floor(128 MiB / 4V) = 220 -> 192
    assert 4 * 192 * v <= 128 * 2**20
    assert chunk_rows_for(10_000, v, 1) == CHUNK_ROW_MULTIPLE  # never below one multiple
    assert chunk_rows_for(150, v, 128) == 150  # all answer tokens in one chunk
    assert chunk_rows_for(200, v, 128) == 128  # 2 balanced chunks of 100 -> 128, not 192 + 8
    for n in range(1, 3000, 37):
        rows = chunk_rows_for(n, v, 128)
        assert rows <= 192 and (rows == n or rows % CHUNK_ROW_MULTIPLE == 0)
        assert -(-n // rows) == -(-n // 192)  # as few chunks as the cap allows
    with pytest.raises(ValueError, match="chunk_mb"):
        chunk_rows_for(10, v, 0)


def test_chunk_from_budget_equals_explicit_chunk():
    tensors, y = make_inputs(n=300, d_s=16, d_w=12, v=2048, masked_every=0)
    rows = chunk_rows_for(300, 2048, 0.5)  # 0.5 MiB / 8 KiB per row = 64 rows
    assert rows == 64
    a, b = leaves(tensors), leaves(tensors)
    la = chunked_mixed_ce(*a, y, 0.5, chunk_mb=0.5)
    lb = chunked_mixed_ce(*b, y, 0.5, chunk_size=rows)
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    for s, t in zip(a, b):
        assert torch.equal(s.grad, t.grad)
