"""The WMSS mixed-logit cross-entropy (DESIGN.md §1.3 and §4).

``z_mix = lam * z_strong + (1 - lam) * z_weak`` and the loss is ``CE(z_mix, y)`` averaged over
answer tokens. Its gradient w.r.t. the logits is ``g = softmax(z_mix) - onehot(y)``; the strong
logits receive ``lam * g`` and the weak ones ``(1 - lam) * g``.

Two implementations with the same value:

- :func:`mixed_ce_naive` takes ``[N, V]`` logits (reference, small batches, diagnostics).
- :func:`chunked_mixed_ce` takes hidden states and head weights and never holds ``[N, V]``
  logits: it loops over chunks of answer tokens and computes loss and gradients in one pass
  (the Liger-style fused linear cross-entropy, extended to two heads). Beyond the gradients it
  returns it holds one ``[chunk, V]`` fp32 buffer (``4 * chunk * V`` bytes; 223 MiB at the
  default 256 MiB budget and V = 151,936: 384 tokens) plus ``O(chunk * D)`` rows and row-block
  temporaries of at most 1/8 of the buffer each. Its GEMMs run in the input dtype (bf16 on bf16 inputs,
  with the GEMM's own fp32 accumulation); the softmax and the weight-gradient sums over chunks
  are fp32. The chunk is sized from a memory budget (:func:`chunk_rows_for`, ``mix.chunk_mb``)
  unless given.

Labels are already aligned with the rows (no shifting here): row ``n`` is scored against
``labels[n]`` and rows with ``labels[n] == ignore_index`` are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmss_ray.losses.chunk_ops import (
    CHUNK_ROW_MULTIPLE,
    accumulate_weight_grad,
    ce_grad_in_place,
    expand_in_place,
    mixed_ce_in_place,
    narrow_in_place,
    row_logsumexp,
)
from wmss_ray.losses.constants import IGNORE_INDEX, LOW_PRECISION_DTYPES

#: Default budget of the ``[chunk, V]`` fp32 buffer, MiB (``mix.chunk_mb``; the config's default,
#: a test keeps them equal). 256 MiB: 384 tokens at V = 151,936, the loss's working memory 0.056x
#: the naive loss's and its time 1.00-1.06x the old 1,024-token chunk's (BENCHMARKS.md).
DEFAULT_CHUNK_MB = 256.0

#: Keys of the ``stats`` dict returned by ``chunked_mixed_ce(..., return_stats=True)``.
STATS_KEYS = (
    "ce_mix_sum",
    "ce_strong_sum",
    "p_mix_sum",
    "p_strong_sum",
    "nontarget_grad_mix_sum",
    "nontarget_grad_strong_sum",
    "n_tokens",
)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the softmax runs in: fp32 for half/bf16 inputs, else the input dtype (fp32/fp64)."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


def _check_lam(lam) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam


def mix_logits(z_strong: torch.Tensor, z_weak: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * z_strong + (1 - lam) * z_weak``; any matching shapes, e.g. ``[N, V]``."""
    return lam * z_strong + (1.0 - lam) * z_weak


def mixed_ce_naive(
    z_strong: torch.Tensor,
    z_weak: torch.Tensor | None,
    labels: torch.Tensor,
    lam: float,
    ignore_index: int = IGNORE_INDEX,
    num_tokens=None,
) -> torch.Tensor:
    """Mean CE of the mixed logits over non-ignored rows (the reference implementation).

    Args:
        z_strong, z_weak: ``[N, V]`` logits (``z_weak`` may be None when ``lam == 1``).
            Weak log-probs may replace weak logits: softmax is shift-invariant per row.
        labels: ``[N]`` int64, aligned with the rows; ``ignore_index`` rows are skipped.
        num_tokens: divisor override (global answer-token count); default: valid rows here.

    Returns:
        0-dim loss (fp32 for half/bf16 inputs). All rows ignored -> 0.0 with a graph, no NaN.
    """
    lam = _check_lam(lam)
    z = z_strong.to(_acc_dtype(z_strong.dtype))
    if z_weak is not None:  # mixed even at lam == 1, so the weak side gets its (zero) gradient
        z = mix_logits(z, z_weak.to(z.dtype), lam)
    elif lam != 1.0:
        raise ValueError("z_weak is None but lam != 1; only pure SFT (lam=1) needs no weak model")
    n_valid = int((labels != ignore_index).sum())
    divisor = n_valid if num_tokens is None else float(num_tokens)
    # reduction="sum" over zero rows is 0 with a graph; "mean" would be 0/0 = NaN.
    total = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    return total / divisor if n_valid > 0 else total


def chunk_rows_for(n_tokens: int, vocab: int, chunk_mb: float) -> int:
    """Answer tokens per chunk so that the ``[chunk, V]`` fp32 buffer takes about ``chunk_mb`` MiB.

    The budget gives a cap of ``floor(chunk_mb MiB / (4 V))`` rows, rounded down to a multiple of
    :data:`CHUNK_ROW_MULTIPLE` (at least one multiple: at V = 151,936 the minimum of 64 rows is
    37 MiB). ``n_tokens`` that fit under the cap are one chunk of exactly ``n_tokens`` rows;
    otherwise the rows are split into ``ceil(n_tokens / cap)`` equal chunks, each rounded up to
    the multiple (never above the cap), so no chunk is a thin remainder of a few rows and every
    GEMM keeps a ``[>= 64, D] x [D, V]`` shape. E.g. V = 151,936: 128 MiB -> cap 192 rows
    (111 MiB); 256 MiB (the default) -> 384 rows (223 MiB).
    """
    if vocab < 1 or chunk_mb <= 0:
        raise ValueError(f"vocab must be >= 1 and chunk_mb > 0, got {vocab} and {chunk_mb}")
    m = CHUNK_ROW_MULTIPLE
    cap = max(m, int(chunk_mb * 2**20) // (4 * vocab) // m * m)
    if n_tokens <= cap:
        return max(1, n_tokens)
    n_chunks = -(-n_tokens // cap)
    return min(cap, -(-(-(-n_tokens // n_chunks)) // m) * m)


def _fused_forward(h_s, w_s, h_w, w_w, labels, lam, chunk_size, ignore_index, divisor, needs, stats):
    """One pass over answer-token chunks: loss and (where ``needs``) the input gradients.

    Shapes: ``h_s [N, D_s]``, ``w_s [V, D_s]``, ``h_w [N, D_w]``, ``w_w [V, D_w]``,
    ``labels [N]``. ``needs`` = 4 bools (h_s, w_s, h_w, w_w). ``stats`` is None or a dict
    filled with :data:`STATS_KEYS`. Returns ``(loss 0-dim, (grad_h_s, grad_w_s, grad_h_w,
    grad_w_w))``; gradients are for a loss gradient of 1 and None where not needed. Weight
    gradients of half/bf16 weights are accumulated in fp32 (many chunks add into them).

    Memory: ONE ``[chunk, V]`` buffer in the accumulation dtype (fp32 for half/bf16 and fp32
    inputs: ``4 * chunk * V`` bytes), reused by every chunk. Half/bf16 inputs: the logit GEMMs
    write their half-precision output into the first half of that buffer's bytes, which is
    widened to fp32 in place for the softmax; the gradient ``softmax - onehot`` is narrowed back
    in place for the gradient GEMMs. No other ``[chunk, V]`` tensor is allocated; the remaining
    temporaries are ``O(chunk * D)`` rows, the stats' row blocks (1/8 of the buffer) and the
    weight-gradient blocks (1/8 of the buffer, half/bf16 only).
    """
    use_weak = lam != 1.0
    low = h_s.dtype in LOW_PRECISION_DTYPES
    acc = _acc_dtype(h_s.dtype)
    device = h_s.device
    valid = (labels != ignore_index).nonzero().squeeze(1)  # [n_valid]; masked rows cost nothing
    n_valid = valid.numel()

    def weight_grad(t, need):
        # Uninitialised: the first chunk writes it without reading (no V*D zero-fill pass).
        alloc = torch.empty if n_valid > 0 else torch.zeros
        return alloc(t.shape, dtype=_acc_dtype(t.dtype), device=device) if need else None

    grads = [  # grad_h rows of masked tokens stay 0
        torch.zeros_like(h_s) if needs[0] else None,
        weight_grad(w_s, needs[1]),
        torch.zeros_like(h_w) if needs[2] else None,
        weight_grad(w_w, needs[3]),
    ]
    vocab = w_s.shape[0]
    # The one [chunk, V] buffer, reused by every chunk (a fresh one per chunk costs page faults
    # on CPU: large allocations are mmap'ed and returned on free). flat16 is the same bytes seen
    # as 2-byte elements (half/bf16 inputs only).
    buf32 = torch.empty(min(chunk_size, n_valid) * vocab, dtype=acc, device=device)
    buf16 = buf32.view(h_s.dtype) if low else None
    loss_sum = torch.zeros((), dtype=acc, device=device)
    if stats is not None:
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # STATS_KEYS[:6]
    scale = 1.0 / divisor if n_valid > 0 else 0.0
    coef = (lam * scale, (1.0 - lam) * scale)  # d loss / d z_strong, d z_weak = coef * g

    for start in range(0, n_valid, chunk_size):
        idx = valid[start : start + chunk_size]  # [c]
        c = idx.numel()
        y = labels.index_select(0, idx)  # [c]
        rows = torch.arange(c, device=device)
        hs = h_s.index_select(0, idx)  # [c, D_s]
        hw = h_w.index_select(0, idx) if use_weak else None  # [c, D_w]
        z = buf32[: c * vocab].view(c, vocab)  # [c, V] in acc, contiguous
        zl = buf16[: c * vocab].view(c, vocab) if low else z  # where the GEMMs write
        torch.mm(hs, w_s.t(), out=zl)  # z_strong, GEMM in the input dtype
        if stats is not None:  # strong-alone CE needs z_strong before it is mixed in place
            ce_s = row_logsumexp(zl, acc) - zl[rows, y].to(acc)  # [c]
            p_s = torch.exp(-ce_s)
            sums[1] += ce_s.sum()
            sums[3] += p_s.sum()
            sums[5] += (1.0 - p_s).sum()
        if use_weak:  # z <- lam * z + (1 - lam) * hw @ w_w^T, in place, in the GEMM
            zl.addmm_(hw, w_w.t(), beta=lam, alpha=1.0 - lam)
        if low:
            expand_in_place(buf32, buf16, c * vocab)  # z_mix in fp32 for the softmax
        sumexp, ce_mix = mixed_ce_in_place(z, rows, y, lam, sums if stats is not None else None)
        loss_sum += ce_mix.sum()
        if not any(needs):
            continue
        ce_grad_in_place(z, sumexp, rows, y)  # z is now g = softmax(z_mix) - onehot(y), unscaled  [c, V]
        if low:
            narrow_in_place(buf32, buf16, c * vocab)  # g in the input dtype for its GEMMs
        for side, (h, w, hc) in enumerate(((h_s, w_s, hs), (h_w, w_w, hw))):
            need_h, need_w = needs[2 * side], needs[2 * side + 1]
            if need_h:  # grad_h rows = coef * g @ W   [c, D]
                grads[2 * side].index_copy_(0, idx, torch.mm(zl, w).mul_(coef[side]))
            if need_w:  # grad_W += coef * g^T @ h   [V, D], accumulated in acc dtype
                accumulate_weight_grad(grads[2 * side + 1], zl, hc, coef[side], first=start == 0)

    if stats is not None:
        stats.update({k: sums[i].detach() for i, k in enumerate(STATS_KEYS[:6])})
        stats["n_tokens"] = torch.tensor(valid.numel(), dtype=torch.int64, device=device)
    return loss_sum * scale, tuple(grads)


class _ChunkedMixedCE(torch.autograd.Function):
    """Gradients are computed in forward (one pass) and scaled by ``grad_output`` in backward."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_w, w_w, labels, lam, chunk_size, ignore_index, divisor, needs, stats):
        loss, grads = _fused_forward(
            h_s, w_s, h_w, w_w, labels, lam, chunk_size, ignore_index, divisor, needs, stats
        )
        ctx.grads = grads
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (h_s, w_s, h_w, w_w))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_mixed_ce: backward ran twice; its precomputed gradients are consumed "
                "by the first backward (retain_graph is not supported)"
            )
        grads, ctx.grads = ctx.grads, None
        # The usual case (loss.backward() on this loss alone) needs no extra pass over V*D.
        unit = bool((grad_loss == 1).all())
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is not None:
                if not unit:
                    g.mul_(grad_loss.to(g.dtype))  # in place: no second V*D buffer
                g = g.to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None, None, None)


def chunked_mixed_ce(
    h_strong: torch.Tensor,
    w_strong: torch.Tensor,
    h_weak: torch.Tensor | None,
    w_weak: torch.Tensor | None,
    labels: torch.Tensor,
    lam: float,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_tokens=None,
    return_stats: bool = False,
    chunk_mb: float = DEFAULT_CHUNK_MB,
):
    """Mixed-logit CE from hidden states and LM-head weights, chunked over answer tokens.

    Equals ``mixed_ce_naive(h_strong @ w_strong.T, h_weak @ w_weak.T, labels, lam)`` in value
    and gradients, without materialising ``[N, V]`` logits. Memory beyond the inputs and the
    gradients it returns: one ``[chunk, V]`` fp32 buffer (``4 * chunk * V`` bytes; fp64 inputs:
    8) plus temporaries of at most 1/8 of it (see ``_fused_forward``). The returned weight
    gradients of half/bf16 weights are accumulated in fp32 (``[V, D]`` fp32 each) and cast to
    the weight dtype at backward.

    Args:
        h_strong: ``[N, D_s]`` final hidden states of the strong model (flatten ``[B, T, D]``
            and align with ``labels`` first: row ``n`` predicts ``labels[n]``).
        w_strong: ``[V, D_s]`` strong LM-head weight.
        h_weak, w_weak: ``[N, D_w]``, ``[V, D_w]`` (D_w may differ from D_s; the vocabulary
            must match). Both may be None when ``lam == 1`` (plain SFT).
        labels: ``[N]`` int64; ``ignore_index`` rows are skipped before any matmul.
        lam: mixing weight in [0, 1].
        chunk_size: answer tokens per chunk; None (or 0): :func:`chunk_rows_for` from ``chunk_mb``.
        num_tokens: divisor (python int or 0-dim tensor), e.g. the global count of answer
            tokens over ranks and micro-batches so that summed losses and gradients equal the
            full batch's. Default: the number of non-ignored rows here.
        return_stats: also return a dict of detached 0-dim tensors summed over valid tokens
            (:data:`STATS_KEYS`): ``ce_mix_sum`` (the loss before dividing),
            ``ce_strong_sum`` (CE of the strong logits alone),
            ``p_mix_sum`` / ``p_strong_sum`` (target probabilities), ``nontarget_grad_mix_sum``
            (non-target gradient mass the strong logits receive, ``lam * (1 - P_mix(y))``),
            ``nontarget_grad_strong_sum`` (plain CE's, ``1 - P_strong(y)``), ``n_tokens``.
            Costs one extra logsumexp over the strong logits per chunk.
        chunk_mb: MiB budget of the ``[chunk, V]`` fp32 buffer when ``chunk_size`` is None.

    Returns:
        0-dim loss (fp32 for half/bf16 inputs), or ``(loss, stats)``. Gradients flow to every
        input with ``requires_grad``; a frozen weak side (no grad) costs no gradient work.
        Backward may run once (the gradients are precomputed and consumed).
    """
    lam = _check_lam(lam)
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1 (or None/0: sized from chunk_mb), got {chunk_size}")
    if h_strong.dim() != 2 or w_strong.dim() != 2 or h_strong.shape[1] != w_strong.shape[1]:
        raise ValueError(
            f"h_strong must be [N, D] and w_strong [V, D]; got {tuple(h_strong.shape)} and "
            f"{tuple(w_strong.shape)}"
        )
    if labels.shape != (h_strong.shape[0],):
        raise ValueError(f"labels must be [N={h_strong.shape[0]}], got {tuple(labels.shape)}")
    use_weak = lam != 1.0
    if use_weak:
        if h_weak is None or w_weak is None:
            raise ValueError("h_weak/w_weak are None but lam != 1; only lam=1 (SFT) needs no weak model")
        if h_weak.shape[0] != h_strong.shape[0] or h_weak.dim() != 2 or w_weak.dim() != 2:
            raise ValueError(f"h_weak must be [N, D_w], got {tuple(h_weak.shape)}")
        if w_weak.shape != (w_strong.shape[0], h_weak.shape[1]):
            raise ValueError(
                f"w_weak must be [V={w_strong.shape[0]}, D_w={h_weak.shape[1]}] (weak and strong "
                f"must share the vocabulary), got {tuple(w_weak.shape)}"
            )
        if h_weak.dtype != h_strong.dtype:
            raise ValueError(f"h_weak is {h_weak.dtype} but h_strong is {h_strong.dtype}")
    else:  # lam == 1: the weak side has weight 0; skip it entirely
        h_weak = w_weak = None

    n_valid = int((labels != ignore_index).sum())
    divisor = float(n_valid if num_tokens is None else num_tokens)
    if n_valid > 0 and divisor <= 0:
        raise ValueError(f"num_tokens must be > 0 when there are answer tokens, got {num_tokens}")
    if not chunk_size:
        chunk_size = chunk_rows_for(n_valid, w_strong.shape[0], chunk_mb)

    grad_on = torch.is_grad_enabled()
    needs = tuple(
        bool(grad_on and t is not None and t.requires_grad) for t in (h_strong, w_strong, h_weak, w_weak)
    )
    stats = {} if return_stats else None
    args = (h_strong, w_strong, h_weak, w_weak, labels, lam, chunk_size, ignore_index, divisor)
    if any(needs):
        loss = _ChunkedMixedCE.apply(*args, needs, stats)
    else:  # evaluation / no_grad: loss only, no gradient buffers
        loss, _ = _fused_forward(*args, needs, stats)
    return (loss, stats) if return_stats else loss
