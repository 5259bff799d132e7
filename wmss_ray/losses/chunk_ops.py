"""In-place kernels of the chunked mixed CE (``losses.mixing``) and the dtype rules it shares
with the weak sides (``losses.weak_side``) and the naive references (``losses.reference``):
dtype widening/narrowing inside one buffer, a row log-sum-exp, the weight-gradient GEMM, and the
CE and its gradient in place on a ``[c, V]`` fp32 chunk. Plain torch, no allocation beyond
``[c]`` vectors unless stated.
"""

from __future__ import annotations

import torch

from wmss_ray.losses.constants import LOW_PRECISION_DTYPES

#: Chunk rows are a multiple of this (GEMM tiles) unless one chunk holds all answer tokens.
CHUNK_ROW_MULTIPLE = 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the softmax runs in: fp32 for half/bf16 inputs, else the input dtype (fp32/fp64)."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


def check_lam(lam) -> float:
    """``lam`` as a float, refused outside [0, 1] (0 is the weak model alone, 1 plain SFT)."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam


def expand_in_place(flat32: torch.Tensor, flat16: torch.Tensor, n: int) -> None:
    """Widen ``n`` half/bf16 values stored in the first half of a buffer to fp32, in place.

    ``flat16`` is the same storage as ``flat32`` viewed as 2-byte elements. fp32 element ``i``
    (bytes ``[4i, 4i+4)``) is read from 2-byte element ``i`` (bytes ``[2i, 2i+2)``); walking
    down in halving blocks ``[ceil(e/2), e)`` makes every copy's source and destination bytes
    disjoint and never overwrites a value not yet read. About log2(n) copies, no temporary.
    """
    end = n
    while end > 1:
        start = (end + 1) // 2
        flat32[start:end].copy_(flat16[start:end])
        end = start
    if n:
        flat32[:1].copy_(flat16[:1].clone())  # element 0 overlaps itself: a 1-element copy


def narrow_in_place(flat32: torch.Tensor, flat16: torch.Tensor, n: int) -> None:
    """The inverse of :func:`expand_in_place`: ``n`` fp32 values -> half/bf16 in the first half.

    Walks up in doubling blocks ``[s, 2s)`` (destination bytes ``[2s, 4s)``, source
    ``[4s, 8s)``: disjoint, and only bytes of elements already narrowed are overwritten).
    """
    if n:
        flat16[:1].copy_(flat32[:1].clone())
    start = 1
    while start < n:
        end = min(2 * start, n)
        flat16[start:end].copy_(flat32[start:end])
        start = end


def row_logsumexp(z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``logsumexp(z, dim=1)`` in ``acc`` over row blocks of ``z [c, V]`` (``[c]`` out).

    ``torch.logsumexp`` on the whole chunk would allocate ``[c, V]`` temporaries; blocks of
    ``c // 16`` rows bound them to 1/8 of the buffer (upcast + exp, 2 x ``[c/16, V]``).
    """
    rows = max(1, z.shape[0] // 16)
    return torch.cat([torch.logsumexp(z[r : r + rows].to(acc), dim=1) for r in range(0, z.shape[0], rows)])


def accumulate_weight_grad(out: torch.Tensor, g: torch.Tensor, h: torch.Tensor, alpha: float, first: bool) -> None:
    """``out (+)= alpha * g^T @ h``: ``out [V, D]`` in acc dtype, ``g [c, V]``, ``h [c, D]``.

    Same dtype (fp32/fp64 inputs): one in-place ``addmm_`` (``beta = 0`` on the first chunk, so
    the uninitialised accumulator is never read). Half/bf16 ``g, h``: the GEMM runs in the input
    dtype (fp32 accumulation inside the GEMM), in blocks of vocabulary rows whose
    ``[rows, D]`` half-precision product is added into the fp32 accumulator; a block is at most
    1/8 of the ``[c, V]`` fp32 buffer's bytes, so no ``[V, D]`` temporary exists.
    """
    if g.dtype == out.dtype:
        out.addmm_(g.t(), h, beta=0.0 if first else 1.0, alpha=alpha)
        return
    v, d = out.shape
    rows = max(CHUNK_ROW_MULTIPLE, (g.numel() * 4 // 8) // (2 * d) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)
    for r in range(0, v, rows):
        block = torch.mm(g[:, r : r + rows].t(), h)  # [rows, D] in the input dtype
        if first:
            out[r : r + rows].copy_(block).mul_(alpha)
        else:
            out[r : r + rows].add_(block, alpha=alpha)  # promoted: computed in fp32


def mixed_ce_in_place(z: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of mixed logits by a stable log-sum-exp, in place.

    ``z`` [c, V] fp32 mixed logits becomes ``exp(z - rowmax)``; ``rows`` [c] = ``arange(c)``,
    ``y`` [c] labels. Returns ``(sumexp [c], ce [c])``.
    """
    z.sub_(z.amax(dim=1, keepdim=True))
    z_y = z[rows, y]  # [c] shifted target logits (a copy)
    z.exp_()
    sumexp = z.sum(dim=1)  # [c]
    return sumexp, sumexp.log() - z_y


def ce_grad_in_place(z: torch.Tensor, sumexp: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> None:
    """``exp(z - rowmax)`` [c, V] from :func:`mixed_ce_in_place` -> ``softmax(z) - onehot(y)``, in place."""
    z.div_(sumexp.unsqueeze(1))
    z[rows, y] -= 1.0


def rows_per_forward(rows: int, width: int, vocab: int, logits_mb: float, bytes_per_logit: int = 4) -> int:
    """Rows of a ``[rows, width]`` batch one forward may take so that its ``[rows, width, V]``
    logits fit ``logits_mb`` MiB at ``bytes_per_logit`` bytes per logit (at least 1, at most ``rows``).

    A no-grad forward (scoring, the evaluation's teacher-forced CE) materialises the whole
    ``[rows, width, V]`` logits at once; at V = 151,936 and width 4,096 one row is 1.16 GiB in
    bf16, so the rows per forward must follow the budget, not the batch size. Scores and losses
    do not depend on the split (right padding, causal attention).
    """
    if rows < 0 or width < 1 or vocab < 1 or logits_mb <= 0 or bytes_per_logit < 1:
        raise ValueError(f"need rows >= 0, width, vocab, bytes_per_logit >= 1 and logits_mb > 0; got {rows}, "
                         f"{width}, {vocab}, {bytes_per_logit}, {logits_mb}")
    fit = int(logits_mb * 2**20) // (width * vocab * bytes_per_logit)
    return max(1, min(rows, fit))
