"""Next-token entropy of a causal LM over answer tokens (DESIGN.md §1.1, phase 2A input).

``H(M; x_i)`` is the mean, over the positions that predict answer tokens, of the entropy
``-sum_k p_k log p_k`` of the model's next-token distribution. Labels are unshifted as HF causal
LMs take them: the logits at position ``t`` predict token ``t + 1``, so position ``t`` counts iff
``labels[:, t + 1] != ignore_index``.
"""

from __future__ import annotations

import torch

from wmss_ray.losses.constants import IGNORE_INDEX, LOW_PRECISION_DTYPES


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dim: ``[..., V] -> [...]``, computed in fp32 (fp64 stays fp64).

    Uses log_softmax for stability; vocabulary entries with probability 0 (e.g. ``-inf``
    logits) contribute 0 rather than ``0 * -inf = NaN``.
    """
    x = logits.float() if logits.dtype in LOW_PRECISION_DTYPES else logits
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    return -(p * logp).masked_fill_(p == 0, 0.0).sum(dim=-1)


def sample_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    return_counts: bool = False,
):
    """Mean next-token entropy per row over the positions that predict answer tokens.

    Args:
        logits: ``[B, T, V]`` (any float dtype; entropies are computed in fp32).
        labels: ``[B, T]`` unshifted labels, ``ignore_index`` on prompt and padding tokens.
        chunk_size: answer positions per chunk; only the selected positions' ``[chunk, V]``
            logits are upcast at a time, so memory beyond the input is O(chunk_size * V).
            Prompt and padding positions are never touched (right padding cannot change a
            row's score).
        return_counts: also return the number of answer tokens per row.

    Returns:
        ``h [B] float32`` (0 for a row without answer tokens), or ``(h, n_answer_tokens [B]
        int64)`` with ``return_counts=True``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch = logits.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    total = torch.zeros(batch, dtype=acc, device=logits.device)
    # Position t predicts labels[:, t + 1]; the last position predicts nothing.
    predicts_answer = labels[:, 1:] != ignore_index  # [B, T-1]
    counts = predicts_answer.sum(dim=1)  # [B] int64
    rows, cols = predicts_answer.nonzero(as_tuple=True)  # [n] each
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        total.index_add_(0, r, token_entropy(logits[r, c]).to(acc))  # logits[r, c]: [chunk, V]
    h = torch.where(counts > 0, total / counts.clamp(min=1), torch.zeros_like(total))
    h = h.to(torch.float32)
    return (h, counts) if return_counts else h
