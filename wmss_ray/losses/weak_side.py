"""The weak side of the chunked mixed CE, per chunk of answer rows, and the truncation bound.

``losses.mixing`` runs one chunk loop; what differs between placements is how a chunk's weak
logits enter the ``[c, V]`` buffer that holds the strong logits:

- :class:`HiddenWeakSide` (``mix.placement: colocated``): the weak model's final hidden states
  and LM head, ``h_w[rows] @ W_w^T`` mixed in inside the GEMM (input dtype, before widening);
  trainable (``joint``: gradients for ``h_w`` and ``W_w``) or frozen.
- :class:`LogProbWeakSide` (``mix.placement: pool``): the pool's :class:`WeakLogProbs`, dense
  ``[N, V]`` or top-k; the ``[c, V]`` block is rebuilt in fp32 after widening; never trained.

Weak log-probs stand in for weak logits exactly (softmax is shift-invariant per row). The
top-k form, reconstructed row by row (:func:`dense_weak_logp` is the naive form)::

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
``m`` and ``U >> A`` the error approaches the bound (an adversarial case in the tests). The loss
is a mean over tokens, so its error is at most the mean of the row bounds. At ``λ = 1`` the weak
side has no weight and both error and bound are 0; with an empty tail (``top_k = V``) too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from wmss_ray.losses.chunk_ops import acc_dtype, accumulate_weight_grad, row_logsumexp
from wmss_ray.losses.stats import LossStats

_TOPK_FIELDS = ("topk_logp", "topk_ids", "label_logp", "tail_logmass")


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
        return WeakLogProbs(self.vocab, **{k: getattr(self, k).index_select(0, idx) for k in _TOPK_FIELDS})

    def slice(self, start: int, stop: int) -> "WeakLogProbs":
        """Rows ``[start, stop)`` as views (no copy)."""
        if self.is_dense:
            return WeakLogProbs(self.vocab, dense=self.dense[start:stop])
        return WeakLogProbs(self.vocab, **{k: getattr(self, k)[start:stop] for k in _TOPK_FIELDS})

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
    logp = logp.to(acc_dtype(logp.dtype))  # half/bf16 -> fp32; fp32/fp64 kept (the wire is fp32)
    if top_k == 0:
        return WeakLogProbs(vocab, dense=logp)
    k = min(top_k, vocab)
    vals, ids = logp.topk(k, dim=1)
    label_logp = logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    masked = logp.scatter(1, ids, -math.inf)
    masked.scatter_(1, labels.unsqueeze(1), -math.inf)
    return WeakLogProbs(vocab, topk_logp=vals, topk_ids=ids, label_logp=label_logp,
                        tail_logmass=torch.logsumexp(masked, dim=1))


def label_in_topk(ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[c]`` bool: whether each row's label is among its top-k ids ``[c, k]``."""
    return (ids == y.unsqueeze(1)).any(dim=1)


def tail_fill(weak: WeakLogProbs, in_topk: torch.Tensor) -> torch.Tensor:
    """``log(T / m)`` per row ``[c]``: the uniform share of the tail mass (0 for an empty tail)."""
    k = weak.topk_ids.shape[1]
    m = (weak.vocab - k - (~in_topk).long()).to(weak.tail_logmass.dtype)  # tail sizes [c]
    fill = weak.tail_logmass - torch.log(m.clamp_min(1))
    return torch.where(m > 0, fill, torch.zeros_like(fill))


def dense_weak_logp(weak: WeakLogProbs, labels: torch.Tensor) -> torch.Tensor:
    """The reconstructed weak log-probs ``[N, V]`` (naive form, for references and samples)."""
    if weak.is_dense:
        return weak.dense
    out = tail_fill(weak, label_in_topk(weak.topk_ids, labels)).unsqueeze(1).expand(-1, weak.vocab).clone()
    out.scatter_(1, weak.topk_ids, weak.topk_logp)
    out.scatter_(1, labels.unsqueeze(1), weak.label_logp.unsqueeze(1))
    return out


def _scaled(c: float, x: torch.Tensor) -> torch.Tensor:
    """``c * x`` with ``0 * -inf = 0`` (a weightless side contributes nothing)."""
    return torch.zeros_like(x) if c == 0 else c * x


def _bound(log_st: torch.Tensor, tail_logmass: torch.Tensor, log_a: torch.Tensor, lam: float) -> torch.Tensor:
    """``log1p(S_t^λ T^(1-λ) / A)`` per row from the three logs ``[c]`` (float64)."""
    return F.softplus(_scaled(lam, log_st.double()) + _scaled(1 - lam, tail_logmass.double()) - log_a.double())


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
    return _bound(log_st, weak.tail_logmass, log_a, lam)


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


# ----------------------------------------------------------------------------- the sides, per chunk


class Chunk(NamedTuple):
    """One chunk of answer rows: ``idx [c]`` their row numbers (``start`` .. in the valid-row
    order), ``y [c]`` labels, ``rows [c]`` = ``arange(c)``; ``contiguous``: ``idx`` is
    ``start .. start + c`` (every row valid), so row blocks are slices, not gathers."""

    start: int
    idx: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor
    contiguous: bool


class HiddenWeakSide:
    """A colocated weak model: ``h [N, D_w]`` final hidden states, ``w [V, D_w]`` LM head.

    ``need_h`` / ``need_w``: gradients wanted (joint mode); frozen costs no gradient work. The
    gradients are written here per chunk (``coef * g @ W`` rows, ``coef * g^T @ h`` summed in
    the accumulation dtype) and read by :attr:`grads` after the loop.
    """

    def __init__(self, h: torch.Tensor, w: torch.Tensor, need_h: bool, need_w: bool, n_valid: int):
        self.h, self.w = h, w
        self.grad_h = torch.zeros_like(h) if need_h else None  # rows of masked tokens stay 0
        # Uninitialised: the first chunk writes it without reading (no V*D zero-fill pass).
        alloc = torch.empty if n_valid > 0 else torch.zeros
        self.grad_w = alloc(w.shape, dtype=acc_dtype(w.dtype), device=w.device) if need_w else None
        self._h_rows = None

    def mix(self, c: Chunk, z: torch.Tensor, zl: torch.Tensor, widen: Callable[[], None], lam: float,
            stats: LossStats | None) -> None:
        """``zl <- lam * zl + (1 - lam) * h[idx] @ w^T`` in the GEMM (input dtype), then widen."""
        self._h_rows = self.h.index_select(0, c.idx)  # [c, D_w]; kept for the weight gradient
        zl.addmm_(self._h_rows, self.w.t(), beta=lam, alpha=1.0 - lam)
        widen()

    def backward(self, c: Chunk, g: torch.Tensor, coef: float) -> None:
        """This chunk's gradients from ``g = softmax - onehot`` ``[c, V]`` (input dtype)."""
        if self.grad_h is not None:  # grad_h rows = coef * g @ W   [c, D_w]
            self.grad_h.index_copy_(0, c.idx, torch.mm(g, self.w).mul_(coef))
        if self.grad_w is not None:  # grad_W += coef * g^T @ h   [V, D_w]
            accumulate_weight_grad(self.grad_w, g, self._h_rows, coef, first=c.start == 0)

    @property
    def grads(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.grad_h, self.grad_w


class LogProbWeakSide:
    """The pool's weak log-probs (:class:`WeakLogProbs` of the ``N`` rows): no gradient."""

    grads = (None, None)

    def __init__(self, weak: WeakLogProbs):
        self.weak = weak

    def mix(self, c: Chunk, z: torch.Tensor, zl: torch.Tensor, widen: Callable[[], None], lam: float,
            stats: LossStats | None) -> None:
        """Widen, then ``z <- lam * z + (1 - lam) * w~`` in fp32, ``z [c, V]`` in the acc dtype.

        Dense: contiguous rows are a slice (no copy); otherwise gathered in blocks of ``c // 16``
        rows (at most 1/16 of the buffer). Top-k: every entry gets ``lam * s + (1 - lam) *
        log(T/m)``, then the exact top-k and label entries are written over; with ``stats``, the
        tail mass and the truncation bound of the rows are added.
        """
        widen()
        n = z.shape[0]
        if self.weak.is_dense:
            step = n if c.contiguous else max(1, n // 16)
            for r in range(0, n, step):
                w = (self.weak.dense[c.start + r: c.start + r + step] if c.contiguous
                     else self.weak.dense.index_select(0, c.idx[r: r + step]))
                z[r: r + step].mul_(lam).add_(w, alpha=1.0 - lam)
            return
        wk = self.weak.slice(c.start, c.start + n) if c.contiguous else self.weak.rows(c.idx)
        acc, rows, y = z.dtype, c.rows, c.y
        in_topk = label_in_topk(wk.topk_ids, y)
        z_k = lam * z.gather(1, wk.topk_ids) + (1.0 - lam) * wk.topk_logp.to(acc)  # mixed, exact  [c, k]
        z_lab = lam * z[rows, y] + (1.0 - lam) * wk.label_logp.to(acc)  # [c]
        if stats is not None:  # S_t: strong exp-sum over the tail (K masked out of z, rewritten below)
            z.scatter_(1, wk.topk_ids, -math.inf)
            z[rows, y] = -math.inf
            log_st = row_logsumexp(z, acc)
            log_a = torch.logsumexp(torch.cat([z_k, z_lab.masked_fill(in_topk, -math.inf).unsqueeze(1)], 1), 1)
            stats.add_truncation_rows(wk.tail_logmass.double(), _bound(log_st, wk.tail_logmass, log_a, lam))
        z.mul_(lam).add_(((1.0 - lam) * tail_fill(wk, in_topk)).to(acc).unsqueeze(1))
        z.scatter_(1, wk.topk_ids, z_k)
        z[rows, y] = z_lab

    def backward(self, c: Chunk, g: torch.Tensor, coef: float) -> None:
        """Frozen: nothing to do."""
