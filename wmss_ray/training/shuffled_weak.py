"""``mix.weak_source: shuffled``: each row is mixed with the real weak logits of *another* row of
about the same length (real marginals, wrong sample), fixed by the seed.

Which row (driver, once per phase, :func:`write_partners`): every tokenised row gets a partner
row. Rows are sorted by length (token count; ties broken by a seeded random key) and cut into
consecutive *length buckets* of ``mix.shuffle_bucket_rows`` rows (a last bucket of one row joins
the one before); inside a bucket, a seeded random cycle maps each row to the next, so no row is
its own partner (a derangement) and each row is some row's partner exactly once. Written as
``<out_dir>/weak_partners.parquet`` (``row``, ``partner``: global row numbers), read by the ranks.

How the logits line up (rank, per micro-batch, :func:`partner_batch`): the partner rows are
collated as their own padded batch and run through the frozen weak model; main row ``i`` has
``n_i`` answer positions and its partner ``m_i``; main answer position ``k`` of row ``i`` takes
the partner's answer position ``k mod m_i`` (rows of a bucket have similar lengths, so mostly
``k``). ``weak_index [N]`` says which partner position each main answer position takes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from wmss_ray.data.chat_tokens import collate
from wmss_ray.io import storage
from wmss_ray.io.storage import resolve_fs
from wmss_ray.losses.constants import IGNORE_INDEX
from wmss_ray.losses.positions import answer_positions
from wmss_ray.training.dataset import tokenized_files

PARTNERS_FILE = "weak_partners.parquet"


def row_lengths(tokenized_path: str) -> np.ndarray:
    """Token count of every tokenised row, in global row order: ``[n_rows] int64``. Reads the
    ``input_ids`` column one file at a time (the driver, once per shuffled phase)."""
    out = []
    for f in tokenized_files(tokenized_path):
        fs, path = resolve_fs(f)
        col = pq.read_table(path, columns=["input_ids"], filesystem=fs).column(0)
        out.append(pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def shuffle_partners(lengths: np.ndarray, seed: int, bucket_rows: int) -> np.ndarray:
    """Partner of each row ``[n] int64`` (see the module docstring): same length bucket, never
    itself, each row a partner once; a pure function of ``(lengths, seed, bucket_rows)``.

    Raises:
        ValueError: fewer than 2 rows (no other row to take), or ``bucket_rows < 2``.
    """
    n = len(lengths)
    if n < 2 or bucket_rows < 2:
        raise ValueError(f"a shuffled weak side needs >= 2 rows and buckets of >= 2 rows, got {n} and {bucket_rows}")
    rng = np.random.default_rng([seed, 0x5EED])
    order = np.lexsort((rng.random(n), np.asarray(lengths)))  # by length, seeded ties
    starts = list(range(0, n, bucket_rows))
    if n - starts[-1] < 2:  # a lone last row joins the bucket before
        starts.pop()
    bounds = starts + [n]
    partner = np.empty(n, np.int64)
    for a, b in zip(bounds[:-1], bounds[1:]):
        members = order[a:b][rng.permutation(b - a)]
        partner[members] = np.roll(members, -1)  # a cycle: each to the next, none to itself
    return partner


def write_partners(tokenized_path: str, seed: int, bucket_rows: int, out_path: str) -> None:
    """Driver side: every tokenised row's partner, as Parquet ``{row, partner}`` at ``out_path``."""
    partner = shuffle_partners(row_lengths(tokenized_path), seed, bucket_rows)
    with storage.open_output(out_path) as f:
        pq.write_table(pa.table({"row": pa.array(np.arange(len(partner)), pa.int64()),
                                 "partner": pa.array(partner, pa.int64())}), f)


def read_partners(path: str) -> np.ndarray:
    """Rank side: ``partner[global row]`` ``[n_rows] int64``."""
    fs, p = resolve_fs(path)
    t = pq.read_table(p, columns=["row", "partner"], filesystem=fs)
    out = np.empty(t.num_rows, np.int64)
    out[t.column("row").to_numpy()] = t.column("partner").to_numpy()
    return out


def _answer_count(row: dict) -> int:
    """Answer positions of a tokenised row: positions ``t`` with ``labels[t + 1] != -100``."""
    return int((np.asarray(row["labels"])[1:] != IGNORE_INDEX).sum())


def partner_batch(rows: Sequence[dict], partners: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The weak side's inputs of one micro-batch (host tensors).

    ``rows``: the micro-batch's tokenised rows, ``partners``: each row's partner row. Returns the
    partners collated (``input_ids, attention_mask, labels [B, T_p]``), ``answer_pos [M]`` (their
    answer positions, flat, row-major) and ``weak_index [N]``: for each of the main rows' ``N``
    answer positions (row-major, as ``PairLM`` orders them), the index into those ``M``.
    """
    batch = collate(partners, pad_id)
    index, offset = [], 0
    for row, partner in zip(rows, partners):
        n, m = _answer_count(row), _answer_count(partner)
        if m == 0:
            raise ValueError("a partner row has no answer token")
        index.append(offset + np.arange(n) % m)
        offset += m
    batch["answer_pos"] = answer_positions(batch["labels"])
    batch["weak_index"] = torch.from_numpy(np.concatenate(index).astype(np.int64))
    return batch
