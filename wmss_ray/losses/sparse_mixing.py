"""The mixed-logit CE with the weak side given as (sparse) log-probs, not hidden states.

Used by ``mix.placement: pool`` (DESIGN.md §3): the frozen weak model runs elsewhere and sends,
per answer position, either its dense log-probs ``[N, V]`` (``top_k: 0``) or its top-k
log-probs with their ids, the label's exact log-prob and the tail log-mass. Weak log-probs may
stand in for weak logits exactly (softmax is shift-invariant per row), so the dense form gives
:func:`wmss_ray.losses.mixing.chunked_mixed_ce`'s frozen loss and strong gradients.

The sparse weak side, reconstructed row by row (:func:`dense_weak_logp` is the naive form)::

    w~_v = log q_v                      for v in K = top-k ids  ∪ {label}
    w~_v = log(T / m)                   for the m = V - |K| other ("tail") tokens,
                                        T = sum_{v not in K} q_v  (tail_logmass = log T)

so ``sum_v exp(w~_v) = 1`` again: the tail keeps its mass, spread uniformly.

**The truncation error bound.** Strong logits ``s``, exact weak log-probs ``log q``, mixing
weight ``λ`` in (0, 1]. The mixed CE of a row is ``log Σ_v exp(λ s_v) q_v^(1-λ) - z_y`` and the
label term ``z_y`` is exact (y is in K). Split the exp-sum into
``A = Σ_{v in K} e^{λ s_v} q_v^(1-λ)`` (exact in both), and the tail parts
``B = Σ_tail e^{λ s_v} q_v^(1-λ)`` (exact) and ``B~ = (T/m)^(1-λ) Σ_tail e^{λ s_v}``
(reconstructed). Hölder's inequality with exponents ``1/λ`` and ``1/(1-λ)`` gives

    B  <= (Σ_tail e^{s_v})^λ (Σ_tail q_v)^(1-λ)           = S_t^λ T^(1-λ)
    B~ = (T/m)^(1-λ) Σ_tail (e^{s_v})^λ · 1^(1-λ)
       <= (T/m)^(1-λ) (Σ_tail e^{s_v})^λ m^(1-λ)           = S_t^λ T^(1-λ)

with ``S_t`` the strong exp-sum over the tail only. Both ``log(1 + B/A)`` and
``log(1 + B~/A)`` therefore lie in ``[0, log1p(U/A)]``, ``U = S_t^λ T^(1-λ)``, and

    |ΔCE| = |log(A + B~) - log(A + B)| <= log1p(S_t^λ T^(1-λ) / A).

This is the issue's suggested bound with the strong exp-sum restricted to the tail (tighter,
since ``S_t <= S``; the suggested one follows). It is tight: when both tails sit on one
same token, ``B = U`` (Hölder equality) while ``B~ = U · m^(λ-1)``, so for a large tail size
``m`` and ``U >> A`` the error approaches the bound (an adversarial case in the tests). The loss is a mean over
tokens, so its error is at most the mean of the row bounds. At ``λ = 1`` the weak side has no
weight and both error and bound are 0; with an empty tail (``top_k = V``) too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wmss_ray.losses.chunk_ops import (
    accumulate_weight_grad,
    ce_grad_in_place,
    expand_in_place,
    mixed_ce_in_place,
    narrow_in_place,
    row_logsumexp,
)
from wmss_ray.losses.constants import IGNORE_INDEX, LOW_PRECISION_DTYPES
from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB, STATS_KEYS, _acc_dtype, _check_lam, chunk_rows_for, mixed_ce_naive

#: Extra keys of the stats of :func:`sparse_mixed_ce` (summed / max over valid rows).
TRUNC_STATS_KEYS = ("tail_mass_sum", "tail_mass_max", "trunc_bound_sum")


@dataclass
class WeakLogProbs:
    """The weak side of ``N`` rows, dense or top-k (all fp32, rows aligned with the labels).

    Dense: ``dense [N, V]`` log-probs. Top-k: ``topk_logp [N, k]`` log-probs, ``topk_ids
    [N, k]`` int64 distinct ids, ``label_logp [N]`` the label's exact log-prob,
    ``tail_logmass [N]`` = logsumexp of the log-probs outside the top-k *and* the label
    (``-inf`` for an empty tail); ``vocab`` is V.
    """

    vocab: int
    dense: torch.Tensor | None = None
    topk_logp: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    label_logp: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def n_rows(self) -> int:
        return (self.dense if self.is_dense else self.label_logp).shape[0]

    def rows(self, idx: torch.Tensor) -> "WeakLogProbs":
        """The sub-batch of rows ``idx`` (``[n]`` int64)."""
        if self.is_dense:
            return WeakLogProbs(self.vocab, dense=self.dense.index_select(0, idx))
        return WeakLogProbs(self.vocab, topk_logp=self.topk_logp.index_select(0, idx),
                            topk_ids=self.topk_ids.index_select(0, idx),
                            label_logp=self.label_logp.index_select(0, idx),
                            tail_logmass=self.tail_logmass.index_select(0, idx))

    def check(self, n_rows: int) -> None:
        if self.is_dense:
            if self.dense.shape != (n_rows, self.vocab):
                raise ValueError(f"dense weak log-probs must be [N={n_rows}, V={self.vocab}], "
                                 f"got {tuple(self.dense.shape)}")
            return
        k = self.topk_ids.shape[1] if self.topk_ids is not None and self.topk_ids.dim() == 2 else -1
        shapes = {"topk_logp": (n_rows, k), "topk_ids": (n_rows, k), "label_logp": (n_rows,),
                  "tail_logmass": (n_rows,)}
        for name, shape in shapes.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shape:
                raise ValueError(f"sparse weak {name} must be {shape}, got {None if t is None else tuple(t.shape)}")
        if not 0 < k <= self.vocab:
            raise ValueError(f"top_k must be in [1, V={self.vocab}], got {k}")


def weak_from_logp(logp: torch.Tensor, labels: torch.Tensor, top_k: int) -> WeakLogProbs:
    """What the weak side ships for rows with log-probs ``logp [N, V]`` and labels ``[N]``.

    ``top_k == 0`` (or >= V): dense. Else the top-k log-probs and ids, the label's log-prob and
    the tail log-mass over every token outside the top-k and the label.
    """
    vocab = logp.shape[1]
    logp = logp.to(_acc_dtype(logp.dtype))  # half/bf16 -> fp32; fp32/fp64 kept (the wire is fp32)
    if top_k == 0:
        return WeakLogProbs(vocab, dense=logp)
    k = min(top_k, vocab)
    vals, ids = logp.topk(k, dim=1)
    label_logp = logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    masked = logp.scatter(1, ids, -math.inf)
    masked.scatter_(1, labels.unsqueeze(1), -math.inf)
    return WeakLogProbs(vocab, topk_logp=vals, topk_ids=ids, label_logp=label_logp,
                        tail_logmass=torch.logsumexp(masked, dim=1))


def _label_in_topk(ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (ids == y.unsqueeze(1)).any(dim=1)  # [c] bool


def _tail_fill(weak: WeakLogProbs, in_topk: torch.Tensor) -> torch.Tensor:
    """``log(T / m)`` per row ``[c]``: the uniform share of the tail mass (0 for an empty tail)."""
    k = weak.topk_ids.shape[1]
    m = (weak.vocab - k - (~in_topk).long()).to(weak.tail_logmass.dtype)  # tail sizes [c]
    fill = weak.tail_logmass - torch.log(m.clamp_min(1))
    return torch.where(m > 0, fill, torch.zeros_like(fill))


def dense_weak_logp(weak: WeakLogProbs, labels: torch.Tensor) -> torch.Tensor:
    """The reconstructed weak log-probs ``[N, V]`` (naive form, for references and samples)."""
    if weak.is_dense:
        return weak.dense
    in_topk = _label_in_topk(weak.topk_ids, labels)
    out = _tail_fill(weak, in_topk).unsqueeze(1).expand(-1, weak.vocab).clone()
    out.scatter_(1, weak.topk_ids, weak.topk_logp)
    out.scatter_(1, labels.unsqueeze(1), weak.label_logp.unsqueeze(1))
    return out


def sparse_mixed_ce_naive(z_strong, weak: WeakLogProbs, labels, lam, ignore_index=IGNORE_INDEX, num_tokens=None):
    """Reference: :func:`mixed_ce_naive` of ``[N, V]`` strong logits and the reconstructed weak."""
    safe = labels.clamp_min(0)  # ignored rows: any id, they are skipped by the CE
    return mixed_ce_naive(z_strong, dense_weak_logp(weak, safe).to(z_strong.dtype), labels, lam,
                          ignore_index=ignore_index, num_tokens=num_tokens)


def _scaled(c: float, x: torch.Tensor) -> torch.Tensor:
    """``c * x`` with ``0 * -inf = 0`` (a weightless side contributes nothing)."""
    return torch.zeros_like(x) if c == 0 else c * x


def truncation_bound(z_strong: torch.Tensor, weak: WeakLogProbs, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-row bound ``log1p(S_t^λ T^(1-λ) / A)`` on |ΔCE| (naive form, ``[N, V]`` strong logits)."""
    if weak.is_dense or lam == 1.0:
        return torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    z = z_strong.double()
    in_k = torch.zeros_like(z, dtype=torch.bool)
    in_k.scatter_(1, weak.topk_ids, True)
    in_k.scatter_(1, labels.unsqueeze(1), True)
    w = dense_weak_logp(weak, labels).double()
    log_a = torch.logsumexp((lam * z + (1 - lam) * w).masked_fill(~in_k, -math.inf), dim=1)
    log_st = torch.logsumexp(z.masked_fill(in_k, -math.inf), dim=1)
    return F.softplus(_scaled(lam, log_st) + _scaled(1 - lam, weak.tail_logmass.double()) - log_a)


def _mix_dense_weak(z: torch.Tensor, dense: torch.Tensor, start: int, idx: torch.Tensor, contiguous: bool,
                    lam: float) -> None:
    """``z <- lam * z + (1 - lam) * dense[rows]`` in place, ``z [c, V]`` in the acc dtype.

    Contiguous rows are a slice (no copy); otherwise the rows are gathered in blocks of
    ``c // 16`` rows, so the gather is at most 1/16 of the ``[c, V]`` buffer.
    """
    c = z.shape[0]
    step = c if contiguous else max(1, c // 16)
    for r in range(0, c, step):
        w = dense[start + r : start + r + step] if contiguous else dense.index_select(0, idx[r : r + step])
        z[r : r + step].mul_(lam).add_(w, alpha=1.0 - lam)


def _fused_forward(h_s, w_s, weak, labels, lam, chunk_size, ignore_index, divisor, needs, stats):
    """One pass over answer-token chunks; ``needs`` = (h_s, w_s). Mirrors mixing._fused_forward.

    Shapes: ``h_s [N, D]``, ``w_s [V, D]``, ``labels [N]``; weak rows aligned with them.
    Returns ``(loss, (grad_h_s, grad_w_s))`` for a loss gradient of 1 (None where not needed).

    Memory, as in :func:`wmss_ray.losses.mixing._fused_forward`: ONE ``[chunk, V]`` buffer in the
    accumulation dtype (fp32 for half/bf16 and fp32 inputs), reused by every chunk. Half/bf16:
    the strong logit GEMM runs in the input dtype into the first half of the buffer's bytes,
    which is widened to fp32 in place; the fp32 weak log-probs are mixed in there, the softmax
    runs in fp32, and ``softmax - onehot`` is narrowed back in place for the gradient GEMMs
    (weight gradient accumulated in fp32). Other temporaries: ``[chunk, k]``, ``O(chunk * D)``
    rows and row blocks of at most 1/8 of the buffer.
    """
    use_weak = lam != 1.0
    low = h_s.dtype in LOW_PRECISION_DTYPES
    acc = _acc_dtype(h_s.dtype)
    device = h_s.device
    n, vocab = labels.shape[0], w_s.shape[0]
    valid = (labels != ignore_index).nonzero().squeeze(1)
    n_valid = valid.numel()
    contiguous = n_valid == n  # every row valid: chunk rows are slices (no gather of weak rows)
    grad_h = torch.zeros_like(h_s) if needs[0] else None
    grad_w = None
    if needs[1]:
        grad_w = (torch.empty if n_valid > 0 else torch.zeros)(w_s.shape, dtype=_acc_dtype(w_s.dtype), device=device)
    buf32 = torch.empty(min(chunk_size, n_valid) * vocab, dtype=acc, device=device)
    buf16 = buf32.view(h_s.dtype) if low else None  # the same bytes as 2-byte elements
    loss_sum = torch.zeros((), dtype=acc, device=device)
    if stats is not None:
        sums = torch.zeros(8, dtype=torch.float64, device=device)  # STATS_KEYS[:6] + tail, bound
        tail_max = torch.zeros((), dtype=torch.float64, device=device)
    scale = 1.0 / divisor if n_valid > 0 else 0.0
    coef = lam * scale
    for start in range(0, n_valid, chunk_size):
        idx = valid[start : start + chunk_size]
        c = idx.numel()
        y = labels.index_select(0, idx)
        rows = torch.arange(c, device=device)
        hs = h_s.index_select(0, idx)
        z = buf32[: c * vocab].view(c, vocab)  # [c, V] in acc
        zl = buf16[: c * vocab].view(c, vocab) if low else z  # where the GEMMs read and write
        torch.mm(hs, w_s.t(), out=zl)  # z_strong, GEMM in the input dtype
        if stats is not None:
            ce_s = row_logsumexp(zl, acc) - zl[rows, y].to(acc)
            p_s = torch.exp(-ce_s)
            sums[1] += ce_s.sum()
            sums[3] += p_s.sum()
            sums[5] += (1.0 - p_s).sum()
        if low:
            expand_in_place(buf32, buf16, c * vocab)  # exact: bf16/half values widened to fp32
        if use_weak and weak.is_dense:
            _mix_dense_weak(z, weak.dense, start, idx, contiguous, lam)
        elif use_weak:
            wk = weak.rows(idx) if not contiguous else WeakLogProbs(
                weak.vocab, topk_logp=weak.topk_logp[start : start + c], topk_ids=weak.topk_ids[start : start + c],
                label_logp=weak.label_logp[start : start + c], tail_logmass=weak.tail_logmass[start : start + c])
            in_topk = _label_in_topk(wk.topk_ids, y)
            s_k = z.gather(1, wk.topk_ids)  # [c, k] strong logits at the top-k ids
            s_y = z[rows, y]  # [c]
            z_k = lam * s_k + (1.0 - lam) * wk.topk_logp.to(acc)  # mixed, exact  [c, k]
            z_lab = lam * s_y + (1.0 - lam) * wk.label_logp.to(acc)  # [c]
            if stats is not None:  # S_t: strong exp-sum over the tail (K masked out)
                z.scatter_(1, wk.topk_ids, -math.inf)
                z[rows, y] = -math.inf
                log_st = row_logsumexp(z, acc)
                log_a = torch.logsumexp(torch.cat([z_k, z_lab.masked_fill(in_topk, -math.inf).unsqueeze(1)], 1), 1)
                tail = wk.tail_logmass.double()
                bound = F.softplus(_scaled(lam, log_st.double()) + _scaled(1 - lam, tail) - log_a.double())
                sums[6] += tail.exp().sum()
                sums[7] += bound.sum()
                tail_max = torch.maximum(tail_max, tail.exp().max())
            # Tail tokens: lam * s + (1 - lam) * log(T/m); then the exact K entries written over.
            z.mul_(lam).add_(((1.0 - lam) * _tail_fill(wk, in_topk)).to(acc).unsqueeze(1))
            z.scatter_(1, wk.topk_ids, z_k)
            z[rows, y] = z_lab
        sumexp, ce_mix = mixed_ce_in_place(z, rows, y, lam, sums if stats is not None else None)
        loss_sum += ce_mix.sum()
        if not any(needs):
            continue
        ce_grad_in_place(z, sumexp, rows, y)  # g = softmax(z_mix) - onehot(y)  [c, V]
        if low:
            narrow_in_place(buf32, buf16, c * vocab)  # g in the input dtype for its GEMMs
        if needs[0]:  # grad_h rows = coef * g @ W   [c, D]
            grad_h.index_copy_(0, idx, torch.mm(zl, w_s).mul_(coef))
        if needs[1]:  # grad_W += coef * g^T @ h   [V, D], accumulated in acc dtype
            accumulate_weight_grad(grad_w, zl, hs, coef, first=start == 0)
    if stats is not None:
        stats.update({k: sums[i].detach() for i, k in enumerate(STATS_KEYS[:6])})
        stats["n_tokens"] = torch.tensor(n_valid, dtype=torch.int64, device=device)
        stats.update(tail_mass_sum=sums[6], tail_mass_max=tail_max, trunc_bound_sum=sums[7])
    return loss_sum * scale, (grad_h, grad_w)


class _SparseMixedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, weak, labels, lam, chunk_size, ignore_index, divisor, needs, stats):
        loss, grads = _fused_forward(h_s, w_s, weak, labels, lam, chunk_size, ignore_index, divisor, needs, stats)
        ctx.grads, ctx.dtypes = grads, (h_s.dtype, w_s.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("sparse_mixed_ce: backward ran twice (retain_graph is not supported)")
        grads, ctx.grads = ctx.grads, None
        unit = bool((grad_loss == 1).all())
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is not None:
                if not unit:
                    g.mul_(grad_loss.to(g.dtype))
                g = g.to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None, None, None, None)


def sparse_mixed_ce(h_strong: torch.Tensor, w_strong: torch.Tensor, weak: WeakLogProbs, labels: torch.Tensor,
                    lam: float, chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX, num_tokens=None,
                    return_stats: bool = False, chunk_mb: float = DEFAULT_CHUNK_MB):
    """Mixed CE of strong hidden states and a frozen weak side given as log-probs, chunked.

    Args:
        h_strong: ``[N, D]`` final strong hidden states (row n predicts ``labels[n]``).
        w_strong: ``[V, D]`` strong LM-head weight.
        weak: :class:`WeakLogProbs` of the same N rows (dense or top-k); never trained.
        labels: ``[N]`` int64, ``ignore_index`` rows skipped.
        lam, chunk_size, num_tokens, chunk_mb: as :func:`~wmss_ray.losses.mixing.chunked_mixed_ce`
            (``chunk_size`` None/0: :func:`~wmss_ray.losses.mixing.chunk_rows_for` from ``chunk_mb``).
        return_stats: also return :data:`~wmss_ray.losses.mixing.STATS_KEYS` plus
            :data:`TRUNC_STATS_KEYS` (tail mass sum / max and the summed per-row error bound;
            zero for a dense weak side or ``lam == 1``).

    Returns:
        0-dim loss (fp32 for half/bf16 inputs) or ``(loss, stats)``. Memory beyond the inputs and
        gradients: one ``[chunk, V]`` fp32 buffer and temporaries of at most 1/8 of it, as
        chunked_mixed_ce (GEMMs in the input dtype, softmax and weight-gradient sums in fp32).
        Dense weak log-probs give chunked_mixed_ce's frozen loss and gradients.
    """
    lam = _check_lam(lam)
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1 (or None/0: sized from chunk_mb), got {chunk_size}")
    if h_strong.dim() != 2 or w_strong.dim() != 2 or h_strong.shape[1] != w_strong.shape[1]:
        raise ValueError(f"h_strong must be [N, D] and w_strong [V, D]; got {tuple(h_strong.shape)}, "
                         f"{tuple(w_strong.shape)}")
    n = h_strong.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N={n}], got {tuple(labels.shape)}")
    if weak.vocab != w_strong.shape[0]:
        raise ValueError(f"weak vocabulary {weak.vocab} != strong head rows {w_strong.shape[0]}")
    weak.check(n)
    n_valid = int((labels != ignore_index).sum())
    divisor = float(n_valid if num_tokens is None else num_tokens)
    if n_valid > 0 and divisor <= 0:
        raise ValueError(f"num_tokens must be > 0 when there are answer tokens, got {num_tokens}")
    if not chunk_size:
        chunk_size = chunk_rows_for(n_valid, w_strong.shape[0], chunk_mb)
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and t.requires_grad) for t in (h_strong, w_strong))
    stats = {} if return_stats else None
    args = (h_strong, w_strong, weak, labels, lam, chunk_size, ignore_index, divisor)
    if any(needs):
        loss = _SparseMixedCE.apply(*args, needs, stats)
    else:
        loss, _ = _fused_forward(*args, needs, stats)
    if stats is not None and "tail_mass_sum" not in stats:  # no valid rows
        zero = torch.zeros((), dtype=torch.float64, device=h_strong.device)
        stats.update(tail_mass_sum=zero, tail_mass_max=zero, trunc_bound_sum=zero)
    return (loss, stats) if return_stats else loss


def truncation_error(z_strong: torch.Tensor, weak: WeakLogProbs, exact_logp: torch.Tensor, labels: torch.Tensor,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Measured ``|CE(approx) - CE(exact)|`` and its bound per row, for a sample of rows.

    ``z_strong [n, V]`` strong logits, ``weak`` the n rows as shipped, ``exact_logp [n, V]`` the
    weak model's exact log-probs of the same rows, ``labels [n]`` (all valid). Float64.
    """
    with torch.no_grad():
        z = z_strong.double()
        ce = [F.cross_entropy(lam * z + (1 - lam) * w.double(), labels, reduction="none")
              for w in (dense_weak_logp(weak, labels), exact_logp)]
        return (ce[0] - ce[1]).abs(), truncation_bound(z, weak, labels, lam)
