"""Sequence packing: the rows of one micro-batch as one sequence, attention never crossing rows.

A padded micro-batch ``[B, T_max]`` spends compute on ``B * T_max - sum(len)`` pad positions. A
packed micro-batch is ``[1, L]`` with ``L = sum(len)``: the rows laid end to end, ``position_ids``
restarting at 0 for each row, and no ``attention_mask``. From that, transformers (5.x) detects
the packed format itself and keeps attention inside each row:

- ``sdpa`` / ``eager`` (only without a KV cache: ``use_cache=False``, as in training):
  ``masking_utils.find_packed_sequence_indices(position_ids)`` (a new row
  starts wherever the position does not grow by 1) and the causal mask is ANDed with a
  same-row mask (a dense ``[L, L]`` boolean mask, so attention FLOPs are those of ``L``, not of
  the rows: packing pays off in the projections/MLP, and fully only with a varlen kernel);
- ``flash_attention_2`` (or any varlen kernel): :func:`pack_rows` also returns the rows'
  boundaries, ``cu_seq_lens`` and ``max_length``, computed here on the host; ``PairLM`` hands
  them to the model as transformers' ``FlashAttentionKwargs`` (``models/varlen.py``), so every
  layer calls ``flash_attn_varlen_func`` with them (no mask, no cross-row work, and no
  per-layer re-derivation from the position ids with its device-to-host sync).

Labels never cross rows: :class:`~wmss_ray.training.pair.PairLM` shifts (position ``t``
predicts label ``t + 1``), so the last token of row ``i`` would be scored against the first
token of row ``i + 1``. The first label of every row is therefore set to -100; in the padded
layout that label is never a target either (nothing precedes it), so both layouts supervise the
same positions with the same targets, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from wmss_ray.losses.constants import IGNORE_INDEX
from wmss_ray.models.varlen import boundaries_from_lengths


def pack_rows(rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor | int]:
    """Pack tokenised rows ``{input_ids, labels}`` into one sequence.

    Returns:
        ``input_ids [1, L]``, ``position_ids [1, L]`` (``0..len_i-1`` per row) and ``labels
        [1, L]`` (the rows' labels, with each row's first label -100), all int64, ``L = sum(len)``;
        ``cu_seq_lens`` int32 ``[n_rows + 1]`` (the rows' boundaries, ``0 .. L``) and
        ``max_length`` (the longest row, a python int) for a varlen attention kernel.

    Raises:
        ValueError: no rows, an empty row, or a row whose labels differ in length from its ids.
    """
    if not rows:
        raise ValueError("pack_rows needs at least one row")
    ids, pos, labels = [], [], []
    for i, r in enumerate(rows):
        x = np.asarray(r["input_ids"], dtype=np.int64)
        y = np.array(r["labels"], dtype=np.int64)  # a copy: the first label is overwritten
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"row {i} of the micro-batch: {len(x)} input ids, {len(y)} labels (need equal, > 0)")
        y[0] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
        pos.append(np.arange(len(x), dtype=np.int64))
    cu_seq_lens, max_length = boundaries_from_lengths([len(x) for x in ids])
    return {"input_ids": torch.from_numpy(np.concatenate(ids))[None],
            "position_ids": torch.from_numpy(np.concatenate(pos))[None],
            "labels": torch.from_numpy(np.concatenate(labels))[None],
            "cu_seq_lens": cu_seq_lens, "max_length": max_length}


def padding_fraction(lengths: Sequence[int], micro_batch_size: int) -> float:
    """Share of pad positions when consecutive groups of ``micro_batch_size`` rows are padded
    to their longest row (what packing saves): ``1 - sum(len) / sum(B_g * max_g len)``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = sum(len(g) * int(g.max()) for g in np.array_split(lengths, range(micro_batch_size, len(lengths),
                                                                                micro_batch_size)))
    return 1.0 - float(lengths.sum()) / padded if padded else 0.0
