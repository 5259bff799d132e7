"""Padded or packed micro-batches of chosen sample ids from a tokenised Parquet (the pool tests' input)."""

from __future__ import annotations

import torch

from wmss_ray.data.chat_tokens import collate
from wmss_ray.training.dataset import RowReader, epoch_list
from wmss_ray.training.packing import pack_rows


class RowsById:
    """``batch(ids, pad_id)`` -> ``{input_ids, attention_mask, labels} [B, T]``, read as a rank reads."""

    def __init__(self, tokenized_path: str):
        self.reader = RowReader(tokenized_path)
        global_rows, ids = epoch_list(tokenized_path)
        self.row_of = dict(zip(ids.to_pylist(), global_rows.tolist()))

    @classmethod
    def from_parquet(cls, tokenized_path: str) -> "RowsById":
        return cls(tokenized_path)

    def batch(self, ids: list[str], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(self.reader.rows([self.row_of[i] for i in ids]), pad_id)

    def packed(self, ids: list[str]) -> dict[str, torch.Tensor]:
        """``{input_ids, position_ids, labels} [1, L]`` of the same rows (``training.packing``)."""
        return pack_rows(self.reader.rows([self.row_of[i] for i in ids]))


def assert_same_reply(got, want) -> None:
    """Two ``WeakReply``s carry the same answer: top-k ids exactly, log-probs within 1e-5."""
    import numpy as np

    for a, b in zip(got.arrays, want.arrays, strict=True):
        if a.dtype == np.int32:
            assert np.array_equal(a, b)  # top-k ids
        else:
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
