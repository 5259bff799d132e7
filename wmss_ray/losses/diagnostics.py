"""Why mixing helps: target probabilities and non-target gradient mass (DESIGN.md §1.3).

Under plain CE the strong logits get ``softmax(z_strong) - onehot(y)``; once the model is
confident (``P_strong(y) -> 1``) the gradient vanishes. Under the mixed loss they get
``lam * (softmax(z_mix) - onehot(y))``: when the weak model is less sure, ``P_mix(y)`` stays
lower and the non-target mass ``sum_{k != y} |grad_k| = lam * (1 - P_mix(y))`` can exceed plain
CE's ``1 - P_strong(y)``. The ratio is the "amplification".

These functions take ``[N, V]`` logits (small batches, tests, notebooks). The trainer gets the
same numbers without a second forward from the loss's ``LossStats``
(``chunked_mixed_ce(..., return_stats=True)``) and :func:`summarize_stats`; both return dicts with
the same keys (:data:`SUMMARY_KEYS`).
"""

from __future__ import annotations

import math

import torch

from wmss_ray.losses.constants import IGNORE_INDEX, LOW_PRECISION_DTYPES

from wmss_ray.losses.reference import mix_logits
from wmss_ray.losses.stats import LossStats

SUMMARY_KEYS = (
    "n_tokens",
    "ce_mix",
    "ce_strong",
    "p_mix_y",
    "p_strong_y",
    "nontarget_grad_mix",
    "nontarget_grad_strong",
    "amplification",
)


# Summary key -> the LossStats field holding its sum over tokens.
_SUM_OF = {
    "ce_mix": "ce_mix_sum",
    "ce_strong": "ce_strong_sum",
    "p_mix_y": "p_mix_sum",
    "p_strong_y": "p_strong_sum",
    "nontarget_grad_mix": "nontarget_grad_mix_sum",
    "nontarget_grad_strong": "nontarget_grad_strong_sum",
}


def _upcast(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in LOW_PRECISION_DTYPES else z


def _valid_logprobs(z_strong, z_weak, labels, lam, ignore_index):
    """Target log-probs of the mixed and the strong-alone logits at valid rows: 2 x ``[n]``."""
    valid = labels != ignore_index  # [N]
    zs = _upcast(z_strong[valid])  # [n, V]
    y = labels[valid].unsqueeze(1)  # [n, 1]
    zm = zs if z_weak is None or lam == 1.0 else mix_logits(zs, _upcast(z_weak[valid]), lam)
    logp_mix = torch.log_softmax(zm, dim=-1).gather(1, y).squeeze(1)
    logp_strong = torch.log_softmax(zs, dim=-1).gather(1, y).squeeze(1)
    return logp_mix, logp_strong


def _ratio(num: float, den: float) -> float:
    """``num / den``; NaN when both are 0 and inf when only ``den`` is (undefined / unbounded)."""
    if den == 0:
        return math.nan if num == 0 else math.inf
    return num / den


def target_probs(z_strong, z_weak, labels, lam, ignore_index: int = IGNORE_INDEX):
    """``(P_mix(y) [n], P_strong(y) [n])`` at the ``n`` non-ignored rows of ``[N, V]`` logits."""
    logp_mix, logp_strong = _valid_logprobs(z_strong, z_weak, labels, float(lam), ignore_index)
    return logp_mix.exp(), logp_strong.exp()


def nontarget_grad_mass(z_strong, z_weak, labels, lam, ignore_index: int = IGNORE_INDEX) -> dict:
    """Mean per-token non-target gradient mass on the strong logits.

    Returns a dict of floats: ``mixed`` (mixed CE: ``lam * (1 - P_mix(y))``), ``plain`` (plain
    CE on the strong logits: ``1 - P_strong(y)``) and ``amplification = mixed / plain``.
    Per token, ``sum_{k != y} |softmax(z)_k| = 1 - p(y)`` since the probabilities are >= 0.
    """
    p_mix, p_strong = target_probs(z_strong, z_weak, labels, lam, ignore_index)
    n = p_mix.numel()
    mixed = float((float(lam) * (1.0 - p_mix)).sum()) / n if n else 0.0
    plain = float((1.0 - p_strong).sum()) / n if n else 0.0
    return {"mixed": mixed, "plain": plain, "amplification": _ratio(mixed, plain)}


def batch_diagnostics(z_strong, z_weak, labels, lam, ignore_index: int = IGNORE_INDEX) -> dict:
    """Per-token means over the non-ignored rows of ``[N, V]`` logits (keys: SUMMARY_KEYS).

    ``ce_mix`` / ``ce_strong``: CE of the mixed / strong-alone logits; ``p_mix_y`` /
    ``p_strong_y``: target probabilities; ``nontarget_grad_*`` and ``amplification`` as in
    :func:`nontarget_grad_mass`. A batch without answer tokens gives zeros (amplification NaN).
    """
    lam = float(lam)
    with torch.no_grad():
        logp_mix, logp_strong = _valid_logprobs(z_strong, z_weak, labels, lam, ignore_index)
        sums = LossStats.zeros(logp_mix.device)  # the loss's own accumulation of the same rows
        sums.add_mixed_rows(-logp_mix, lam)
        sums.add_strong_rows(-logp_strong)
        sums.n_tokens.add_(logp_mix.numel())
    return summarize_stats(sums)


def summarize_stats(stats: LossStats) -> dict:
    """Turn summed stats (``chunked_mixed_ce(..., return_stats=True)``, possibly all-reduced
    over ranks and added over micro-batches) into per-token means (keys: SUMMARY_KEYS)."""
    n = int(stats.n_tokens)
    mean = {k: (float(getattr(stats, src)) / n if n else 0.0) for k, src in _SUM_OF.items()}
    mean["amplification"] = _ratio(mean["nontarget_grad_mix"], mean["nontarget_grad_strong"])
    return {"n_tokens": float(n), **mean}
