"""The naive references of the mixed CE: ``[N, V]`` logits, plain autograd (tests, diagnostics,
small batches). ``losses.mixing`` computes the same values and gradients without ``[N, V]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmss_ray.losses.chunk_ops import acc_dtype, check_lam
from wmss_ray.losses.constants import IGNORE_INDEX
from wmss_ray.losses.weak_side import WeakLogProbs, dense_weak_logp


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
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean CE of the mixed logits over non-ignored rows (the reference implementation).

    Args:
        z_strong, z_weak: ``[N, V]`` logits (``z_weak`` may be None when ``lam == 1``).
            Weak log-probs may replace weak logits: softmax is shift-invariant per row.
        labels: ``[N]`` int64, aligned with the rows; ``ignore_index`` rows are skipped.
        num_tokens: divisor override (global answer-token count); default: valid rows here.
        label_smoothing: ``F.cross_entropy``'s, on the mixed logits.

    Returns:
        0-dim loss (fp32 for half/bf16 inputs). All rows ignored -> 0.0 with a graph, no NaN.
    """
    lam = check_lam(lam)
    z = z_strong.to(acc_dtype(z_strong.dtype))
    if z_weak is not None:  # mixed even at lam == 1, so the weak side gets its (zero) gradient
        z = mix_logits(z, z_weak.to(z.dtype), lam)
    elif lam != 1.0:
        raise ValueError("z_weak is None but lam != 1; only pure SFT (lam=1) needs no weak model")
    n_valid = int((labels != ignore_index).sum())
    divisor = n_valid if num_tokens is None else float(num_tokens)
    # reduction="sum" over zero rows is 0 with a graph; "mean" would be 0/0 = NaN.
    total = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    return total / divisor if n_valid > 0 else total


def sparse_mixed_ce_naive(z_strong, weak: WeakLogProbs, labels, lam, ignore_index=IGNORE_INDEX, num_tokens=None):
    """Reference: :func:`mixed_ce_naive` of ``[N, V]`` strong logits and the reconstructed weak."""
    safe = labels.clamp_min(0)  # ignored rows: any id, they are skipped by the CE
    return mixed_ce_naive(z_strong, dense_weak_logp(weak, safe).to(z_strong.dtype), labels, lam,
                          ignore_index=ignore_index, num_tokens=num_tokens)
