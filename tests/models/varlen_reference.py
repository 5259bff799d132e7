"""A pure-torch varlen attention kernel for CPU tests (no flash-attn here).

Registered with transformers' ``AttentionInterface`` as :data:`NAME`, it does what
``flash_attn_varlen_func`` does with the ``FlashAttentionKwargs`` a packed batch brings: causal
attention inside each segment ``[cu[i], cu[i + 1])`` of the one packed row. It never derives
the boundaries itself (from position ids or a mask): it fails when ``cu_seq_lens_q/k`` or
``max_length_q/k`` are missing or disagree, so a run that reaches it proves the boundaries were
passed, and :data:`CALLS` records the layer of every call (to show every layer got them).

A model uses it when its config's ``_attn_implementation`` is set to :data:`NAME` (tests set it
on loaded models: ``models.attn_implementation`` accepts transformers' own kernels only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "wmss_varlen_reference"
CALLS: list[int] = []  # layer_idx of each call, in order (cleared by the tests)


def varlen_reference_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [1, H, L, D]``, ``key/value [1, H_kv, L, D]`` -> ``([1, L, H, D], None)``."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    assert cu_q is not None and cu_k is not None, "the varlen kernel got no cu_seq_lens (would have to derive them)"
    assert isinstance(max_q, int) and isinstance(max_k, int), f"max_length must be host ints, got {max_q!r}"
    assert attention_mask is None, "a varlen kernel gets no mask from transformers"
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32, cu_q
    assert query.shape[0] == 1 and int(cu_q[-1]) == query.shape[2], (cu_q, query.shape)
    bounds = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    CALLS.append(module.layer_idx)
    rep = query.shape[1] // key.shape[1]  # grouped-query attention: each kv head serves rep query heads
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    is_causal=True, scale=scaling)
                     for a, b in zip(bounds, bounds[1:])], dim=2)  # [1, H, L, D]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the kernel with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_reference_attention)
    return NAME


def use_on(*models: torch.nn.Module | None) -> None:
    """Make these (HF causal LM) models attend with the reference kernel."""
    register()
    for m in models:
        if m is not None:
            m.config._attn_implementation = NAME
