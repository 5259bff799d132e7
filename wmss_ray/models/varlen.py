"""Packed sequences' boundaries handed straight to a varlen attention kernel.

A packed micro-batch is ``[1, L]``: rows laid end to end, ``position_ids`` restarting at 0 per
row (``training/packing.py``). transformers can re-derive the rows from the position ids, but
does so in every layer under ``flash_attention_2`` (``_is_packed_sequence`` and
``prepare_fa_kwargs_from_position_ids``: a cumsum and a device-to-host sync for ``max_seqlen``
per layer). Given transformers' ``FlashAttentionKwargs`` instead (``cu_seq_lens_q/k`` int32
``[n_rows + 1]``, ``max_length_q/k`` python ints), the model forwards them through
``**kwargs`` to every layer's attention function and ``_flash_attention_forward`` calls
``flash_attn_varlen_func`` with them directly. The boundaries are computed here on the host,
once per micro-batch, from lengths the caller already has.

Which kernels get them (:func:`takes_varlen_kwargs`): every attention implementation except
transformers' mask-path ones (``sdpa``, ``eager``, ``flex_attention``). Those keep attention
inside rows through a mask built from the position ids (``masking_utils``) and take no
boundaries; a registered custom kernel (``AttentionInterface.register``) gets no mask at all
from transformers (``_preprocess_mask_arguments`` exits early for names without a mask
function), so the boundaries are the only way it can keep rows apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Attention implementations that keep packed rows apart with a mask derived from position_ids.
MASK_PATH_ATTENTION = frozenset({"sdpa", "eager", "flex_attention"})


def takes_varlen_kwargs(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention implementation (``config._attn_implementation``) takes the
    packed rows' boundaries as ``FlashAttentionKwargs`` (flash-attention 2/3, hub kernels, a
    registered varlen kernel) rather than a mask (sdpa, eager, flex; also when unset)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl is not None and impl not in MASK_PATH_ATTENTION


def boundaries_from_lengths(lengths: Sequence[int]) -> tuple[torch.Tensor, int]:
    """``(cu_seq_lens, max_length)`` of rows of these lengths laid end to end.

    Returns:
        ``cu_seq_lens`` int32 ``[n_rows + 1]`` (``0, len_0, len_0 + len_1, ..., L``; int32 as
        flash-attn requires) on the CPU, and ``max_length`` the longest row, a python int.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or not len(lengths) or (lengths <= 0).any():
        raise ValueError(f"packed rows need one or more positive lengths, got {lengths.tolist()}")
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return torch.from_numpy(cu), int(lengths.max())


def boundaries_from_position_ids(position_ids: np.ndarray) -> tuple[torch.Tensor, int]:
    """:func:`boundaries_from_lengths` of a packed row's position ids ``[1, L]`` (or ``[L]``)
    restarting at 0 per row, read on the host (numpy): a new row starts wherever position is 0."""
    pos = np.asarray(position_ids).reshape(-1)
    starts = np.flatnonzero(pos == 0)
    if not len(starts) or starts[0] != 0:
        raise ValueError("packed position_ids must start at 0 (a row starts wherever the position is 0)")
    return boundaries_from_lengths(np.diff(np.append(starts, len(pos))))


def attention_kwargs(model: torch.nn.Module, cu_seq_lens: torch.Tensor | None,
                     max_length: int | None) -> dict:
    """The ``FlashAttentionKwargs`` for ``model``'s forward: ``{cu_seq_lens_q, cu_seq_lens_k,
    max_length_q, max_length_k}`` (self-attention: q and k share the boundaries) when its kernel
    takes them and the batch is packed (``cu_seq_lens`` given, on the model's device); else ``{}``."""
    if cu_seq_lens is None or not takes_varlen_kwargs(model):
        return {}
    if max_length is None:
        raise ValueError("packed batches pass cu_seq_lens together with max_length (an int, from the host)")
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": int(max_length), "max_length_k": int(max_length)}
