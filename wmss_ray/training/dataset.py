"""Which rows each rank trains on at each step, and the rows themselves.

The data order is a pure function of ``(seed, epoch)``, computed in plain code, so that a
resumed run (or a single-process reference) sees exactly the same global batches:

- the phase's *epoch list* is, for SFT, every tokenised ``sample_id`` (sorted); for WMSS, the
  curriculum's ``sampled_ids.parquet`` (repeats kept, draw order);
- epoch ``e`` visits the epoch list in ``numpy.random.default_rng([seed, e]).permutation``
  order; epochs are concatenated into one stream, so a fractional number of epochs (or a
  forced step count) simply cuts the stream, and every global batch is full;
- optimizer step ``s`` takes stream positions ``[s * G, (s + 1) * G)`` with
  ``G = micro_batch_size * grad_accum * world_size``; inside it, micro-batch ``m = a * W + r``
  (accumulation index ``a``, rank ``r``) is the slice ``[m * mb, (m + 1) * mb)``.

Resuming at step ``s`` therefore skips the consumed micro-batches by arithmetic. Why not Ray
Data's ``random_shuffle`` + ``streaming_split``: the split hands blocks to whichever worker asks
first, so neither the rank-to-row assignment nor the global batch of a step is reproducible,
and exact resume or a reference comparison would be impossible.

Ray Data still does the I/O: each worker reads the tokenised Parquet through its
``get_dataset_shard`` iterator (no split: every worker sees all rows) and keeps the rows it
will use in a compact :class:`RowTable` (int32 tokens, one buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch

from wmss_ray.core.constants import IGNORE_INDEX
from wmss_ray.data.tokenize import collate



# ----------------------------------------------------------------------------- epoch list


def _read_column(path: str, column: str) -> list:
    import pyarrow.dataset as pads

    return pads.dataset(path, format="parquet").to_table(columns=[column]).column(column).to_pylist()


def epoch_sample_ids(tokenized_path: str, sampled_ids_path: str | None = None) -> list[str]:
    """The phase's epoch list: sorted tokenised ids (SFT) or the sampled ids (WMSS).

    Raises:
        ValueError: duplicate tokenised ids, an empty list, or sampled ids missing from the
            tokenised data (naming a few).
    """
    ids = [str(x) for x in _read_column(tokenized_path, "sample_id")]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate sample_id values in {tokenized_path}")
    if sampled_ids_path is None:
        out = sorted(ids)
    else:
        out = [str(x) for x in _read_column(sampled_ids_path, "sample_id")]
        missing = sorted(set(out) - set(ids))
        if missing:
            raise ValueError(f"{len(missing)} sampled ids are not in {tokenized_path}, e.g. {missing[:5]}")
    if not out:
        raise ValueError(f"no training samples (tokenized={tokenized_path}, sampled={sampled_ids_path})")
    return out


_COLUMNS = ["sample_id", "input_ids", "labels"]
#: Local tokenised data up to this size is read by the driver in one pyarrow call.
INLINE_MAX_BYTES = 256 * 2**20


def build_train_dataset(tokenized_path: str, inline_max_bytes: int = INLINE_MAX_BYTES):
    """The Ray Dataset of tokenised rows handed to the trainer (read once, materialised).

    Small local data is read here with pyarrow and put in the object store (``from_arrow``):
    no read tasks, which on a busy machine cost far more than the read. Larger or remote data
    goes through ``ray.data.read_parquet(...).materialize()``. Either way the trainer's workers
    (and any restarted worker group) iterate blocks already in the object store.
    """
    import ray.data

    local = "://" not in tokenized_path
    if local:
        path = Path(tokenized_path).resolve()
        files = [path] if path.is_file() else list(path.rglob("*.parquet"))
        if sum(f.stat().st_size for f in files) <= inline_max_bytes:
            import pyarrow.dataset as pads

            return ray.data.from_arrow(pads.dataset(str(path), format="parquet").to_table(columns=_COLUMNS))
        tokenized_path = str(path)
    return ray.data.read_parquet(tokenized_path, columns=_COLUMNS).materialize()


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class DataPlan:
    """Deterministic assignment of epoch-list indices to (step, accumulation index, rank)."""

    n_per_epoch: int
    epochs: float
    seed: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    max_steps: int | None = None
    exact_steps: int | None = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def total_steps(self) -> int:
        """``exact_steps`` if given, else ``ceil(n * epochs / G)`` capped by ``max_steps``."""
        if self.exact_steps is not None:
            return int(self.exact_steps)
        steps = max(1, math.ceil(self.n_per_epoch * self.epochs / self.global_batch - 1e-9))
        return min(steps, self.max_steps) if self.max_steps else steps

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``[n_per_epoch]`` permutation of the epoch list for ``epoch``."""
        return _permutation(self.n_per_epoch, self.seed, epoch)

    def _stream(self, start: int, stop: int) -> np.ndarray:
        pos = np.arange(start, stop)
        epochs, within = np.divmod(pos, self.n_per_epoch)
        out = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self.epoch_order(int(e))[within[mask]]
        return out

    def step_indices(self, step: int) -> np.ndarray:
        """``[G]`` epoch-list indices of optimizer step ``step`` (0-based), micro-batch-major."""
        return self._stream(step * self.global_batch, (step + 1) * self.global_batch)

    def micro_batch(self, step: int, accum: int, rank: int) -> np.ndarray:
        """``[micro_batch_size]`` epoch-list indices for one micro-batch."""
        m = accum * self.world_size + rank
        start = step * self.global_batch + m * self.micro_batch_size
        return self._stream(start, start + self.micro_batch_size)

    def rank_indices(self, rank: int, start_step: int = 0) -> np.ndarray:
        """Every epoch-list index ``rank`` consumes from ``start_step`` to the end (unique)."""
        parts = [self.micro_batch(s, a, rank) for s in range(start_step, self.total_steps)
                 for a in range(self.grad_accum)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# ----------------------------------------------------------------------------- rows


class RowTable:
    """Tokenised rows by ``sample_id``: all tokens in one int32 buffer plus offsets."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._tokens: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._tok = self._lab = self._off = None

    def __len__(self) -> int:
        return len(self._index)

    def add_arrow(self, table: pa.Table, keep: set[str] | None = None) -> None:
        """Add rows of an Arrow table ``{sample_id, input_ids, labels}`` (``keep``: ids to keep)."""
        ids = [str(x) for x in table.column("sample_id").to_pylist()]
        tok_col = table.column("input_ids").combine_chunks()
        lab_col = table.column("labels").combine_chunks()
        offs = tok_col.offsets.to_numpy()
        toks = tok_col.values.to_numpy(zero_copy_only=False).astype(np.int32)
        labs = lab_col.values.to_numpy(zero_copy_only=False).astype(np.int32)
        if not np.array_equal(offs, lab_col.offsets.to_numpy()):
            raise ValueError("input_ids and labels differ in length in some tokenised rows")
        for i, sid in enumerate(ids):
            if (keep is not None and sid not in keep) or sid in self._index:
                continue
            self._index[sid] = len(self._tokens)
            self._tokens.append(toks[offs[i]:offs[i + 1]])
            self._labels.append(labs[offs[i]:offs[i + 1]])

    @classmethod
    def from_batches(cls, batches: Iterable[pa.Table], keep: set[str] | None = None) -> "RowTable":
        table = cls()
        for batch in batches:
            table.add_arrow(batch, keep)
        missing = (keep or set()) - set(table._index)
        if missing:
            raise ValueError(f"{len(missing)} needed sample ids were not in the dataset, e.g. {sorted(missing)[:5]}")
        return table

    @classmethod
    def from_parquet(cls, path: str, keep: set[str] | None = None) -> "RowTable":
        """Plain pyarrow read (tests, the single-process reference, the benchmark)."""
        import pyarrow.dataset as pads

        tbl = pads.dataset(path, format="parquet").to_table(columns=_COLUMNS)
        return cls.from_batches([tbl], keep)

    def batch(self, sample_ids: Iterable[str], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ``{input_ids, attention_mask, labels}`` ``[B, T]`` for these ids."""
        rows = []
        for sid in sample_ids:
            i = self._index[sid]
            rows.append({"input_ids": self._tokens[i], "labels": self._labels[i]})
        return collate(rows, pad_id)


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Supervised (shifted) positions of a padded batch: ``labels[:, 1:] != -100``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
