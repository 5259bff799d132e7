"""The WMSS mixed-logit cross-entropy (DESIGN.md §1.3 and §4), chunked: one loop, one ``_MixedCE``.

``z_mix = lam * z_strong + (1 - lam) * z_weak`` and the loss is ``CE(z_mix, y)`` averaged over
answer tokens. Its gradient w.r.t. the logits is ``g = softmax(z_mix) - onehot(y)``; the strong
logits receive ``lam * g`` and the weak ones ``(1 - lam) * g``.

Two entry points onto the same loop (:func:`_fused_forward`, :class:`_MixedCE`):

- :func:`chunked_mixed_ce`: the weak side as hidden states and LM head (colocated weak model,
  joint or frozen; ``losses.weak_side.HiddenWeakSide``).
- :func:`sparse_mixed_ce`: the weak side as log-probs, dense or top-k (the weak pool's reply,
  frozen; ``losses.weak_side.LogProbWeakSide``).

Neither holds ``[N, V]`` logits: the loop runs over chunks of answer tokens and computes loss and
gradients in one pass (the Liger-style fused linear cross-entropy, extended to two sides).
Beyond the gradients it returns it holds one ``[chunk, V]`` fp32 buffer (``4 * chunk * V``
bytes; 223 MiB at the default 256 MiB budget and V = 151,936: 384 tokens) plus ``O(chunk * D)``
rows and row-block temporaries of at most 1/8 of the buffer each. Its GEMMs run in the input
dtype (bf16 on bf16 inputs, with the GEMM's own fp32 accumulation); the softmax and the
weight-gradient sums over chunks are fp32. The chunk is sized from a memory budget
(:func:`chunk_rows_for`, ``mix.chunk_mb``) unless given. The naive references are in
``losses.reference``; the statistics are a ``losses.stats.LossStats``.

Labels are already aligned with the rows (no shifting here): row ``n`` is scored against
``labels[n]`` and rows with ``labels[n] == ignore_index`` are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wmss_ray.losses.chunk_ops import (
    CHUNK_ROW_MULTIPLE,
    acc_dtype,
    accumulate_weight_grad,
    ce_grad_in_place,
    check_lam,
    expand_in_place,
    mixed_ce_in_place,
    narrow_in_place,
    row_logsumexp,
)
from wmss_ray.losses.constants import IGNORE_INDEX, LOW_PRECISION_DTYPES
from wmss_ray.losses.stats import LossStats
from wmss_ray.losses.weak_side import Chunk, HiddenWeakSide, LogProbWeakSide, WeakLogProbs

__all__ = ["CHUNK_ROW_MULTIPLE", "DEFAULT_CHUNK_MB", "GPU_CHUNK_MB", "chunk_rows_for", "chunked_mixed_ce",
           "sparse_mixed_ce"]

#: Default budget of the ``[chunk, V]`` fp32 buffer on CPU, MiB (``mix.chunk_mb: null``). 256 MiB:
#: 384 tokens at V = 151,936, the loss's working memory 0.056x the naive loss's and its time
#: 1.00-1.06x the old 1,024-token chunk's on CPU (BENCHMARKS.md).
DEFAULT_CHUNK_MB = 256.0
#: The default on GPU: 1188 MiB = 2,048 tokens at V = 151,936. Measured on an H200 (N = 8,192,
#: D = 1,024, bf16, joint): 45 ms against 54 ms naive and 76 ms at 384 tokens, 2.7 GB extra
#: against 14.2 GB naive (BENCHMARKS.md, the GPU check); small GEMMs leave a GPU idle.
GPU_CHUNK_MB = 1188.0


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


@dataclass
class _Loop:
    """What the loop needs besides the differentiable inputs (``_MixedCE``'s constants).

    ``weak_logp``: the pool's weak side (None: hidden states, or no weak side at ``lam == 1``).
    ``valid``: ``[n_valid]`` int64 indices of the rows with a label (on the labels' device).
    ``needs``: 4 bools, whether (h_s, w_s, h_w, w_w) want gradients. ``stats``: filled by the
    loop when ``want_stats``.
    """

    weak_logp: WeakLogProbs | None
    labels: torch.Tensor
    valid: torch.Tensor
    lam: float
    chunk_size: int
    ignore_index: int
    divisor: float
    needs: tuple[bool, bool, bool, bool]
    want_stats: bool
    stats: LossStats | None = None
    label_smoothing: float = 0.0


def _weak_side(h_w, w_w, loop: _Loop, n_valid: int):
    """The chunk-wise weak side, or None when the weak side has no weight (``lam == 1``)."""
    if loop.lam == 1.0:
        return None
    if loop.weak_logp is not None:
        return LogProbWeakSide(loop.weak_logp)
    return HiddenWeakSide(h_w, w_w, loop.needs[2], loop.needs[3], n_valid)


def _fused_forward(h_s, w_s, h_w, w_w, loop: _Loop):
    """One pass over answer-token chunks: loss and (where ``loop.needs``) the input gradients.

    Shapes: ``h_s [N, D_s]``, ``w_s [V, D_s]``, ``labels [N]``; the weak side's rows aligned
    with them (``h_w [N, D_w]``, ``w_w [V, D_w]``, or ``loop.weak_logp``). Returns ``(loss
    0-dim, (grad_h_s, grad_w_s, grad_h_w, grad_w_w))``; gradients are for a loss gradient of 1
    and None where not needed. Weight gradients of half/bf16 weights are accumulated in fp32
    (many chunks add into them). Sets ``loop.stats`` when ``loop.want_stats``.

    Memory: ONE ``[chunk, V]`` buffer in the accumulation dtype (fp32 for half/bf16 and fp32
    inputs: ``4 * chunk * V`` bytes), reused by every chunk. Half/bf16 inputs: the logit GEMMs
    write their half-precision output into the first half of that buffer's bytes, which is
    widened to fp32 in place for the softmax (the hidden weak side mixes in inside the GEMM,
    before widening; weak log-probs are fp32 and mix in after); the gradient ``softmax - onehot``
    is narrowed back in place for the gradient GEMMs. No other ``[chunk, V]`` tensor is
    allocated; the remaining temporaries are ``O(chunk * D)`` rows, the stats' row blocks (1/8 of
    the buffer) and the weight-gradient blocks (1/8 of the buffer, half/bf16 only).
    """
    labels, lam, chunk_size, needs = loop.labels, loop.lam, loop.chunk_size, loop.needs
    low = h_s.dtype in LOW_PRECISION_DTYPES
    acc = acc_dtype(h_s.dtype)
    device = h_s.device
    valid = loop.valid  # [n_valid]; masked rows cost nothing
    n_valid = valid.numel()
    contiguous = n_valid == labels.shape[0]  # every row valid: chunk rows are slices of the weak rows
    weak = _weak_side(h_w, w_w, loop, n_valid)
    grad_h = torch.zeros_like(h_s) if needs[0] else None  # rows of masked tokens stay 0
    grad_w = None
    if needs[1]:  # uninitialised: the first chunk writes it without reading (no V*D zero-fill)
        grad_w = (torch.empty if n_valid > 0 else torch.zeros)(w_s.shape, dtype=acc_dtype(w_s.dtype), device=device)
    vocab = w_s.shape[0]
    # The one [chunk, V] buffer, reused by every chunk (a fresh one per chunk costs page faults
    # on CPU: large allocations are mmap'ed and returned on free). buf16 is the same bytes seen
    # as 2-byte elements (half/bf16 inputs only).
    buf32 = torch.empty(min(chunk_size, n_valid) * vocab, dtype=acc, device=device)
    buf16 = buf32.view(h_s.dtype) if low else None
    loss_sum = torch.zeros((), dtype=acc, device=device)
    stats = LossStats.zeros(device) if loop.want_stats else None
    scale = 1.0 / loop.divisor if n_valid > 0 else 0.0
    coef_s, coef_w = lam * scale, (1.0 - lam) * scale  # d loss / d z_strong, d z_weak = coef * g

    for start in range(0, n_valid, chunk_size):
        idx = valid[start : start + chunk_size]  # [c]
        c = idx.numel()
        chunk = Chunk(start, idx, labels.index_select(0, idx), torch.arange(c, device=device), contiguous)
        hs = h_s.index_select(0, idx)  # [c, D_s]
        z = buf32[: c * vocab].view(c, vocab)  # [c, V] in acc, contiguous
        zl = buf16[: c * vocab].view(c, vocab) if low else z  # where the GEMMs write
        torch.mm(hs, w_s.t(), out=zl)  # z_strong, GEMM in the input dtype
        if stats is not None:  # strong-alone CE needs z_strong before it is mixed in place
            stats.add_strong_rows(row_logsumexp(zl, acc) - zl[chunk.rows, chunk.y].to(acc))

        def widen(n=c * vocab):  # half/bf16 values -> fp32 in place (exact)
            if low:
                expand_in_place(buf32, buf16, n)

        if weak is not None:
            weak.mix(chunk, z, zl, widen, lam, stats)  # z <- z_mix in acc, widened
        else:
            widen()
        eps = loop.label_smoothing
        # label smoothing: (1-eps) CE + eps mean_v(-log p_v) = CE + eps (z_y - mean_v z_v), shift-free
        smooth = eps * (z[chunk.rows, chunk.y] - z.mean(dim=1)) if eps else None  # [c]
        sumexp, ce_mix = mixed_ce_in_place(z, chunk.rows, chunk.y)
        if stats is not None:  # the statistics keep the plain mixed CE (comparable across arms)
            stats.add_mixed_rows(ce_mix, lam)
        loss_sum += ce_mix.sum() if smooth is None else (ce_mix + smooth).sum()
        if not any(needs):
            continue
        ce_grad_in_place(z, sumexp, chunk.rows, chunk.y)  # z is now g = softmax(z_mix) - onehot(y)  [c, V]
        if eps:  # g = softmax - (1 - eps) onehot - eps / V
            z.sub_(eps / vocab)
            z[chunk.rows, chunk.y] += eps
        if low:
            narrow_in_place(buf32, buf16, c * vocab)  # g in the input dtype for its GEMMs
        if needs[0]:  # grad_h rows = coef * g @ W   [c, D_s]
            grad_h.index_copy_(0, idx, torch.mm(zl, w_s).mul_(coef_s))
        if needs[1]:  # grad_W += coef * g^T @ h   [V, D_s], accumulated in acc dtype
            accumulate_weight_grad(grad_w, zl, hs, coef_s, first=start == 0)
        if weak is not None:
            weak.backward(chunk, zl, coef_w)

    if stats is not None:
        stats.n_tokens.add_(n_valid)
        loop.stats = stats.detach()
    weak_grads = weak.grads if weak is not None else (None, None)
    return loss_sum * scale, (grad_h, grad_w, *weak_grads)


class _MixedCE(torch.autograd.Function):
    """Gradients are computed in forward (one pass) and scaled by ``grad_output`` in backward."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_w, w_w, loop: _Loop):
        loss, grads = _fused_forward(h_s, w_s, h_w, w_w, loop)
        ctx.grads = grads
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (h_s, w_s, h_w, w_w))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "mixed CE: backward ran twice; its precomputed gradients are consumed "
                "by the first backward (retain_graph is not supported)"
            )
        grads, ctx.grads = ctx.grads, None
        # Always scaled, never "is grad_loss 1?": that test is a device-to-host sync per step
        # (and training's grad_loss is the loss scale W * A anyway). Half/bf16 inputs: the
        # scaling is the cast's own pass (fp32 product written as the input dtype, rounded once,
        # as the cast alone would); same dtype: in place, no second buffer.
        return (*(_scaled_grad(g, grad_loss, dtype) for g, dtype in zip(grads, ctx.dtypes)), None)


def _scaled_grad(g: torch.Tensor | None, grad_loss: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``g * grad_loss`` (0-dim) as ``dtype``: one pass over ``g``, no host sync."""
    if g is None:
        return None
    scale = grad_loss.to(g.dtype)
    if g.dtype == dtype:
        return g.mul_(scale)
    return torch.mul(g, scale, out=torch.empty(g.shape, dtype=dtype, device=g.device))


def _check_strong(h_strong: torch.Tensor, w_strong: torch.Tensor, labels: torch.Tensor, chunk_size) -> None:
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1 (or None/0: sized from chunk_mb), got {chunk_size}")
    if h_strong.dim() != 2 or w_strong.dim() != 2 or h_strong.shape[1] != w_strong.shape[1]:
        raise ValueError(
            f"h_strong must be [N, D] and w_strong [V, D]; got {tuple(h_strong.shape)} and "
            f"{tuple(w_strong.shape)}"
        )
    if labels.shape != (h_strong.shape[0],):
        raise ValueError(f"labels must be [N={h_strong.shape[0]}], got {tuple(labels.shape)}")


def _mixed_ce(h_s, w_s, h_w, w_w, weak_logp, labels, lam, chunk_size, ignore_index, num_tokens, return_stats,
              chunk_mb, valid_rows, label_smoothing=0.0):
    """Both entry points, after their own checks: divisor, chunk, needs; the Function or no_grad."""
    if valid_rows is None:  # one device-to-host sync (nonzero); its size is the count
        valid_rows = (labels != ignore_index).nonzero().squeeze(1)
    elif valid_rows.dim() != 1:
        raise ValueError(f"valid_rows must be [n_valid] row indices, got {tuple(valid_rows.shape)}")
    n_valid = valid_rows.numel()
    divisor = float(n_valid if num_tokens is None else num_tokens)
    if n_valid > 0 and divisor <= 0:
        raise ValueError(f"num_tokens must be > 0 when there are answer tokens, got {num_tokens}")
    if not chunk_size:
        chunk_size = chunk_rows_for(n_valid, w_s.shape[0], chunk_mb)
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (h_s, w_s, h_w, w_w))
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    loop = _Loop(weak_logp, labels, valid_rows, lam, chunk_size, ignore_index, divisor, needs, return_stats,
                 label_smoothing=float(label_smoothing))
    if any(needs):
        loss = _MixedCE.apply(h_s, w_s, h_w, w_w, loop)
    else:  # evaluation / no_grad: loss only, no gradient buffers
        loss, _ = _fused_forward(h_s, w_s, h_w, w_w, loop)
    return (loss, loop.stats) if return_stats else loss


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
    valid_rows: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
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
        chunk_size: answer tokens per chunk (tests, benchmarks); None (or 0): :func:`chunk_rows_for`
            from ``chunk_mb``, the way training sizes it.
        num_tokens: divisor (python number; a 0-dim tensor is read on the host: a sync), e.g. the global count of answer
            tokens over ranks and micro-batches so that summed losses and gradients equal the
            full batch's. Default: the number of non-ignored rows here.
        return_stats: also return a :class:`~wmss_ray.losses.stats.LossStats` of sums over the
            valid tokens (its ``CE_FIELDS``; the truncation fields stay 0). Costs one extra
            logsumexp over the strong logits per chunk.
        chunk_mb: MiB budget of the ``[chunk, V]`` fp32 buffer when ``chunk_size`` is None.
        valid_rows: ``[n_valid]`` int64 indices (on the labels' device, increasing) of the rows
            whose label is not ``ignore_index``, when the caller knows them without looking at
            the labels on the device (``training.pair`` passes ``arange(N)``: its rows are the
            answer positions): spares the loss its one device-to-host sync. Not checked.
        label_smoothing: ``eps`` in [0, 1): the loss is ``(1 - eps) CE + eps mean_v(-log p_v)`` of
            the mixed distribution (``torch.nn.functional.cross_entropy``'s definition; the SFT
            label-smoothing control); the stats keep the plain mixed CE.

    Returns:
        0-dim loss (fp32 for half/bf16 inputs), or ``(loss, LossStats)``. Gradients flow to every
        input with ``requires_grad``; a frozen weak side (no grad) costs no gradient work.
        Backward may run once (the gradients are precomputed and consumed).
    """
    lam = check_lam(lam)
    _check_strong(h_strong, w_strong, labels, chunk_size)
    if lam != 1.0:
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
    return _mixed_ce(h_strong, w_strong, h_weak, w_weak, None, labels, lam, chunk_size, ignore_index, num_tokens,
                     return_stats, chunk_mb, valid_rows, label_smoothing)


def sparse_mixed_ce(h_strong: torch.Tensor, w_strong: torch.Tensor, weak: WeakLogProbs, labels: torch.Tensor,
                    lam: float, chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX, num_tokens=None,
                    return_stats: bool = False, chunk_mb: float = DEFAULT_CHUNK_MB,
                    valid_rows: torch.Tensor | None = None, label_smoothing: float = 0.0):
    """Mixed CE of strong hidden states and a frozen weak side given as log-probs, chunked.

    Args:
        h_strong: ``[N, D]`` final strong hidden states (row n predicts ``labels[n]``).
        w_strong: ``[V, D]`` strong LM-head weight.
        weak: :class:`~wmss_ray.losses.weak_side.WeakLogProbs` of the same N rows (dense or
            top-k); never trained.
        labels: ``[N]`` int64, ``ignore_index`` rows skipped.
        lam, chunk_size, num_tokens, chunk_mb, valid_rows, label_smoothing: as :func:`chunked_mixed_ce`.
        return_stats: also return a :class:`~wmss_ray.losses.stats.LossStats` with the
            truncation fields filled (tail mass sum / max and the summed per-row error bound;
            zero for a dense weak side or ``lam == 1``).

    Returns:
        0-dim loss (fp32 for half/bf16 inputs) or ``(loss, LossStats)``. The same loop as
        :func:`chunked_mixed_ce` (one ``[chunk, V]`` fp32 buffer, GEMMs in the input dtype,
        softmax and weight-gradient sums in fp32); dense weak log-probs give its frozen loss and
        gradients.
    """
    lam = check_lam(lam)
    _check_strong(h_strong, w_strong, labels, chunk_size)
    if weak.vocab != w_strong.shape[0]:
        raise ValueError(f"weak vocabulary {weak.vocab} != strong head rows {w_strong.shape[0]}")
    weak.check(h_strong.shape[0])
    return _mixed_ce(h_strong, w_strong, None, None, weak, labels, lam, chunk_size, ignore_index, num_tokens,
                     return_stats, chunk_mb, valid_rows, label_smoothing)
