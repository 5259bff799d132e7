"""Inputs, references and measuring helpers of the mixed-loss tests (tests/losses/test_mixing.py,
test_mixing_memory.py, test_sparse_mixing.py): seeded hidden states and head weights of both sides,
the float64 naive reference, a scaled closeness check, and torch dispatch modes that see every
tensor an op allocates."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wmss_ray.losses.reference import mixed_ce_naive

IGN = -100


def largest_tensor_numel(run) -> int:
    """The most elements of any tensor an op produced while ``run()`` ran (forward and backward)."""
    biggest = [0]

    class MaxNumel(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    biggest[0] = max(biggest[0], o.numel())
            return out

    with MaxNumel():
        run()
    return biggest[0]


def assert_one_chunk_buffer(allocs, n: int, v: int, d: int, chunk: int) -> list:
    """Of the fresh allocations ``(shape, dtype, bytes)`` of a loss step, the large ones other than
    the gradients (fp32 accumulators ``[V, D]``, their dtype casts, ``grad_h [N, D]``) are exactly
    one fp32 ``[chunk * V]`` buffer; returns the large ones."""
    buffer_bytes = 4 * chunk * v
    big = [a for a in allocs if a[2] >= buffer_bytes // 4]
    assert [a for a in big if a[0] not in {(v, d), (n, d)}] == [((chunk * v,), torch.float32, buffer_bytes)]
    return big


def fresh_allocations(fn):
    """(shape, dtype, nbytes) of every op output that owns new storage while ``fn`` runs."""
    seen = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                    seen.append((tuple(o.shape), o.dtype, o.untyped_storage().nbytes()))
            return out

    with Allocations():
        fn()
    return seen


def make_inputs(n=37, d_s=16, d_w=12, v=50, dtype=torch.float32, masked_every=3, seed=0):
    """Hidden states and head weights of both sides plus labels with some ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d_s, generator=g, dtype=torch.float64)
    ws = torch.randn(v, d_s, generator=g, dtype=torch.float64) / d_s**0.5
    hw = torch.randn(n, d_w, generator=g, dtype=torch.float64)
    ww = torch.randn(v, d_w, generator=g, dtype=torch.float64) / d_w**0.5
    y = torch.randint(0, v, (n,), generator=g)
    if masked_every:
        y[::masked_every] = IGN
    return [t.to(dtype) for t in (hs, ws, hw, ww)], y


def leaves(tensors, requires=(True, True, True, True)):
    return [t.detach().clone().requires_grad_(r) for t, r in zip(tensors, requires)]


def naive_reference(tensors, y, lam, num_tokens=None):
    """float64 naive loss and its 4 gradients, from the same hidden states."""
    hs, ws, hw, ww = leaves([t.double() for t in tensors])
    loss = mixed_ce_naive(hs @ ws.T, hw @ ww.T, y, lam, num_tokens=num_tokens)
    return loss.detach(), torch.autograd.grad(loss, (hs, ws, hw, ww))


def assert_close(actual, ref, rtol=1e-5):
    """rtol on every entry, with an absolute floor scaled to the tensor (entries near 0)."""
    ref = ref.double()
    atol = rtol * max(ref.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.double(), ref, rtol=rtol, atol=atol)
