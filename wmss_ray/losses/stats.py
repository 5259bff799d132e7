"""``LossStats``: the named statistics of the mixed loss, from the loss to ``metrics.jsonl``.

The loss fills one per micro-batch (sums over its answer tokens, detached float64 0-dim
tensors); the training step adds them over its micro-batches (:meth:`LossStats.add_`) and
all-reduces them over ranks (``training.metrics.all_reduce_stats``: one SUM and one MAX
collective over the tensors of :meth:`LossStats.pack`); ``training.metrics`` reads the fields
by name. Packing into tensors happens here and nowhere else.

How a field combines: added over micro-batches and ranks (the default), maximum over both
(``*_max``), or added over a rank's micro-batches and maximum over ranks (``pool_wait_s``: the
slowest rank's wait).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Fields kept as a maximum over a rank's micro-batches (every other field is added).
_MAX_OVER_MICRO_BATCHES = frozenset({"tail_mass_max", "sampled_error_max"})
#: Fields max-reduced over ranks (every other field is summed): the maxima, and ``pool_wait_s``
#: (each rank's total over its micro-batches; the step waited as long as the slowest rank).
_MAX_OVER_RANKS = _MAX_OVER_MICRO_BATCHES | {"pool_wait_s"}


class LossStats(NamedTuple):
    """Sums (and maxima) over answer tokens; every field a float64 0-dim tensor on one device.

    A NamedTuple (not a dataclass) so that DeepSpeed's ZeRO-3 module hooks, which walk a
    forward's outputs, see its tensors. Accumulation is in place on those tensors.

    The mixed CE (every placement): ``ce_mix_sum`` (the loss before dividing), ``ce_strong_sum``
    (CE of the strong logits alone), ``p_mix_sum`` / ``p_strong_sum`` (target probabilities),
    ``nontarget_grad_mix_sum`` (non-target gradient mass the strong logits receive,
    ``lam * (1 - P_mix(y))``), ``nontarget_grad_strong_sum`` (plain CE's, ``1 - P_strong(y)``),
    ``n_tokens``.

    A top-k weak side (``mix.placement: pool``; 0 otherwise): ``tail_mass_sum`` /
    ``tail_mass_max`` (the weak tail mass T), ``trunc_bound_sum`` (the per-token bound on the
    truncation error, ``losses.weak_side``); on sampled positions measured against the exact
    weak log-probs: ``sampled_error_sum`` / ``sampled_error_max``, ``sampled_bound_sum``,
    ``n_sampled``. The pool's transport, added by the training step: ``pool_reply_bytes`` (reply
    arrays of the answer positions), ``pool_wait_s`` (seconds this rank waited for replies).
    """

    ce_mix_sum: torch.Tensor
    ce_strong_sum: torch.Tensor
    p_mix_sum: torch.Tensor
    p_strong_sum: torch.Tensor
    nontarget_grad_mix_sum: torch.Tensor
    nontarget_grad_strong_sum: torch.Tensor
    n_tokens: torch.Tensor
    tail_mass_sum: torch.Tensor
    trunc_bound_sum: torch.Tensor
    sampled_error_sum: torch.Tensor
    sampled_bound_sum: torch.Tensor
    n_sampled: torch.Tensor
    pool_reply_bytes: torch.Tensor
    tail_mass_max: torch.Tensor
    sampled_error_max: torch.Tensor
    pool_wait_s: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device | str | None = None) -> "LossStats":
        """All fields 0 (the identity of :meth:`add_`: every statistic is >= 0)."""
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in cls._fields))

    # ---- accumulation inside the loss, one ``[c]`` block of rows at a time

    def add_strong_rows(self, ce_strong: torch.Tensor) -> None:
        """Rows' CE of the strong logits alone ``[c]``."""
        p = torch.exp(-ce_strong)
        self.ce_strong_sum.add_(ce_strong.sum())
        self.p_strong_sum.add_(p.sum())
        self.nontarget_grad_strong_sum.add_((1.0 - p).sum())

    def add_mixed_rows(self, ce_mix: torch.Tensor, lam: float) -> None:
        """Rows' CE of the mixed logits ``[c]``."""
        p = torch.exp(-ce_mix)
        self.ce_mix_sum.add_(ce_mix.sum())
        self.p_mix_sum.add_(p.sum())
        self.nontarget_grad_mix_sum.add_((lam * (1.0 - p)).sum())

    def add_truncation_rows(self, tail_logmass: torch.Tensor, bound: torch.Tensor) -> None:
        """Rows' weak tail log-mass and truncation bound ``[c]`` (float64)."""
        tail = tail_logmass.exp()
        self.tail_mass_sum.add_(tail.sum())
        self.trunc_bound_sum.add_(bound.sum())
        _max_into(self.tail_mass_max, tail.max())

    def add_sampled_rows(self, error: torch.Tensor, bound: torch.Tensor) -> None:
        """Measured truncation error and its bound on sampled rows ``[n]``, ``n >= 1``."""
        self.sampled_error_sum.add_(error.sum())
        self.sampled_bound_sum.add_(bound.sum())
        self.n_sampled.add_(error.numel())
        _max_into(self.sampled_error_max, error.max())

    def add_pool_reply(self, nbytes: float, wait_s: float) -> None:
        """One pool reply's answer-position bytes and the seconds waited for it."""
        self.pool_reply_bytes.add_(nbytes)
        self.pool_wait_s.add_(wait_s)

    # ---- combining micro-batches and ranks

    def add_(self, other: "LossStats") -> "LossStats":
        """Fold ``other`` (another micro-batch of this rank) in, field by field; returns self."""
        for name, mine, theirs in zip(self._fields, self, other):
            if name in _MAX_OVER_MICRO_BATCHES:
                _max_into(mine, theirs)
            else:
                mine.add_(theirs)
        return self

    def detach(self) -> "LossStats":
        return LossStats(*(t.detach().to(torch.float64) for t in self))

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(to_sum [n_sum], to_max [n_max])`` float64: the fields by how ranks reduce them."""
        return tuple(torch.stack([getattr(self, n).to(torch.float64) for n in _names(kind)])
                     for kind in ("sum", "max"))

    @classmethod
    def unpack(cls, to_sum: torch.Tensor, to_max: torch.Tensor) -> "LossStats":
        """The inverse of :meth:`pack` (after the all-reduce)."""
        return cls(**dict(zip(_names("sum"), to_sum.unbind())), **dict(zip(_names("max"), to_max.unbind())))

    def floats(self) -> dict[str, float]:
        """Every field as a python float (one device-to-host copy per reduction kind)."""
        to_sum, to_max = self.pack()
        return dict(zip(_names("sum"), to_sum.tolist())) | dict(zip(_names("max"), to_max.tolist()))


def _max_into(acc: torch.Tensor, x: torch.Tensor) -> None:
    torch.maximum(acc, x.to(acc.dtype), out=acc)


def _names(reduce: str) -> tuple[str, ...]:
    """The fields reduced over ranks by ``reduce`` ("sum" | "max"), in declaration order."""
    return tuple(n for n in LossStats._fields if (n in _MAX_OVER_RANKS) == (reduce == "max"))


#: The statistics every mixed CE fills (the rest: a top-k weak side and the pool's transport).
CE_FIELDS = ("ce_mix_sum", "ce_strong_sum", "p_mix_sum", "p_strong_sum", "nontarget_grad_mix_sum",
             "nontarget_grad_strong_sum", "n_tokens")
#: The statistics a weak side given as log-probs adds (0 for a dense one or ``lam == 1``).
TRUNCATION_FIELDS = ("tail_mass_sum", "tail_mass_max", "trunc_bound_sum")
