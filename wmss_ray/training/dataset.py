"""Which rows each rank trains on at each step, and how a rank reads just those rows.

The data order is a pure function of ``(seed, epoch)``, computed in plain code, so that a
resumed run (or a single-process reference) sees exactly the same global batches:

- the phase's *epoch list* is, for SFT, every tokenised ``sample_id`` (sorted); for WMSS, the
  curriculum's ``sampled_ids.parquet`` (repeats kept, draw order). The driver writes it once as
  ``<out_dir>/epoch_rows.parquet``: per entry the *global row number* into the tokenised
  Parquet (files in sorted path order, rows in file order) and the ``sample_id``;
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

Each rank reads only its own rows, step by step (:class:`RowReader`): the plan names the
step's global row numbers, the reader maps them to Parquet row groups (from the files' footers)
and reads only those row groups' ``input_ids`` / ``labels`` with pyarrow (local paths or
pyarrow URIs), keeping at most :data:`ROW_GROUP_CACHE_BYTES` of decoded row groups. What a rank
holds per corpus row is 16 bytes (its epoch-list entry and one permutation), never the tokens;
what the driver ships to the workers is the plan (seed, sizes) and two paths. The worker reads
step ``s + 1``'s rows in a background thread while step ``s`` trains (:class:`ReadAhead`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from wmss_ray.io import storage
from wmss_ray.io.storage import list_files, resolve_fs
from wmss_ray.losses.constants import IGNORE_INDEX

_TOKEN_COLUMNS = ["input_ids", "labels"]
#: Decoded row groups a :class:`RowReader` keeps (LRU): a small corpus is read once, a large
#: one costs a bounded amount of memory whatever its size.
ROW_GROUP_CACHE_BYTES = 32 * 2**20
EPOCH_ROWS_FILE = "epoch_rows.parquet"


# ----------------------------------------------------------------------------- epoch list


def tokenized_files(tokenized_path: str) -> list[str]:
    """The tokenised Parquet files in the order that defines global row numbers (sorted paths).

    ``tokenized_path`` is a file or a directory, local or a pyarrow URI.
    """
    fs, path = resolve_fs(tokenized_path)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return [tokenized_path if "://" in tokenized_path else path]
    files = list_files(tokenized_path if "://" in tokenized_path else path, ".parquet")
    if not files:
        raise FileNotFoundError(f"no .parquet files under {tokenized_path}")
    return files


def _read_ids(files: Sequence[str]) -> pa.Array:
    parts = []
    for f in files:
        fs, path = resolve_fs(f)
        parts.append(pq.read_table(path, columns=["sample_id"], filesystem=fs).column(0).cast(pa.string()))
    return pa.chunked_array(parts, type=pa.string()).combine_chunks()


def epoch_list(tokenized_path: str, sampled_ids_path: str | None = None) -> tuple[np.ndarray, pa.Array]:
    """The phase's epoch list: ``(global row numbers [n] int64, sample ids [n])``.

    SFT (``sampled_ids_path`` None): every tokenised row, in sorted ``sample_id`` order; WMSS:
    the sampled ids in draw order, repeats kept.

    Raises:
        ValueError: duplicate tokenised ids, an empty list, or sampled ids missing from the
            tokenised data (naming a few).
    """
    ids = _read_ids(tokenized_files(tokenized_path))
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError(f"duplicate sample_id values in {tokenized_path}")
    if sampled_ids_path is None:
        rows = pc.array_sort_indices(ids)
    else:
        sampled = _read_ids([sampled_ids_path])
        rows = pc.index_in(sampled, value_set=ids)
        if rows.null_count:
            missing = pc.unique(sampled.filter(pc.is_null(rows))).to_pylist()
            raise ValueError(f"{len(missing)} sampled ids of {sampled_ids_path} are not in {tokenized_path}, "
                             f"e.g. {sorted(missing)[:5]}")
    if len(rows) == 0:
        raise ValueError(f"no training samples (tokenized={tokenized_path}, sampled={sampled_ids_path})")
    rows = rows.to_numpy(zero_copy_only=False).astype(np.int64)
    return rows, ids.take(pa.array(rows))


def epoch_sample_ids(tokenized_path: str, sampled_ids_path: str | None = None) -> list[str]:
    """The epoch list as sample ids (see :func:`epoch_list`)."""
    return epoch_list(tokenized_path, sampled_ids_path)[1].to_pylist()


def write_epoch_rows(tokenized_path: str, sampled_ids_path: str | None, out_path: str) -> int:
    """Driver side: write the epoch list to ``out_path`` (Parquet ``{row, sample_id}``, a local
    path or a URI of the run storage, written whole then moved in place); returns its length."""
    rows, ids = epoch_list(tokenized_path, sampled_ids_path)
    with storage.open_output(out_path) as f:
        pq.write_table(pa.table({"row": pa.array(rows, pa.int64()), "sample_id": ids}), f)
    return len(rows)


def read_epoch_rows(path: str) -> np.ndarray:
    """Worker side: the epoch list's global row numbers ``[n] int64`` (the ids are not read)."""
    fs, p = resolve_fs(path)
    return pq.read_table(p, columns=["row"], filesystem=fs).column(0).to_numpy().astype(np.int64)


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

    def for_world(self, world: int) -> "DataPlan":
        """The same plan on ``world`` ranks: the same global batch ``G``, order and steps, with
        ``grad_accum = G / (micro_batch_size * world)`` (a resumed or resized run's split).

        Raises:
            ValueError: ``G`` is not a multiple of ``micro_batch_size * world``.
        """
        if world == self.world_size:
            return self
        mb, g = self.micro_batch_size, self.global_batch
        if g % (mb * world):
            raise ValueError(f"the global batch {g} (micro_batch_size {mb} x grad_accum {self.grad_accum} x "
                             f"{self.world_size} workers) does not split over {world} workers of micro-batch {mb}: "
                             f"G / (micro_batch_size x workers) must be an integer")
        return replace(self, grad_accum=g // (mb * world), world_size=world)

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

    def micro_batch(self, step: int, accum: int, rank: int) -> np.ndarray:
        """``[micro_batch_size]`` epoch-list indices for one micro-batch."""
        m = accum * self.world_size + rank
        start = step * self.global_batch + m * self.micro_batch_size
        return self._stream(start, start + self.micro_batch_size)

    def rank_step(self, step: int, rank: int) -> np.ndarray:
        """``[grad_accum * micro_batch_size]`` epoch-list indices of ``rank`` at ``step``,
        accumulation-major (micro-batch ``a`` is slice ``a``)."""
        return np.concatenate([self.micro_batch(step, a, rank) for a in range(self.grad_accum)])


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# ----------------------------------------------------------------------------- rows


class RowReader:
    """Random access to tokenised rows by global row number, one row group at a time.

    Args:
        tokenized_path: the tokenised Parquet (file or directory; local or a pyarrow URI).
        cache_bytes: decoded row groups kept (LRU, at least the last one read).

    Only the files' footers are read up front (row counts per row group: ``O(row groups)``
    memory). :meth:`rows` reads each row group it needs once per call, ``input_ids`` and
    ``labels`` only; I/O per step is therefore ``(row groups touched) x (row-group size)``,
    which is why the tokenise phase writes row groups of a few MB.
    """

    def __init__(self, tokenized_path: str, cache_bytes: int = ROW_GROUP_CACHE_BYTES):
        self.path = tokenized_path
        self.files = tokenized_files(tokenized_path)
        self._meta = []
        starts, self._groups = [0], []  # (file index, row group) per global row group
        for fi, f in enumerate(self.files):
            fs, p = resolve_fs(f)
            with fs.open_input_file(p) as fh:
                md = pq.ParquetFile(fh).metadata
            self._meta.append(md)
            for g in range(md.num_row_groups):
                self._groups.append((fi, g))
                starts.append(starts[-1] + md.row_group(g).num_rows)
        self._starts = np.asarray(starts, dtype=np.int64)  # [n_groups + 1]
        self.num_rows = int(self._starts[-1])
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cached = 0
        self.groups_read = 0  # row-group reads so far (I/O accounting for benchmarks/tests)

    def _group(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(offsets [n+1], input_ids [sum len] int32, labels [sum len] int32)`` of row group ``g``."""
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        fi, rg = self._groups[g]
        fs, p = resolve_fs(self.files[fi])
        with fs.open_input_file(p) as fh:
            table = pq.ParquetFile(fh, metadata=self._meta[fi]).read_row_group(rg, columns=_TOKEN_COLUMNS)
        self.groups_read += 1
        tok, lab = (table.column(c).combine_chunks() for c in _TOKEN_COLUMNS)
        offs = tok.offsets.to_numpy().astype(np.int64)
        bad = (tok.is_null().to_numpy(zero_copy_only=False) | lab.is_null().to_numpy(zero_copy_only=False))
        bad |= offs[1:] - offs[:-1] != np.diff(lab.offsets.to_numpy())
        bad |= offs[1:] == offs[:-1]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            first = int(self._starts[g] - self._starts[self._groups.index((fi, 0))]) + i
            raise ValueError(f"{self.files[fi]}, row {first}: input_ids and labels must be non-empty lists of "
                             f"equal length (got {tok[i].as_py()!r:.80} / {lab[i].as_py()!r:.80})")
        base = offs[0]
        entry = (offs - base,
                 tok.values.to_numpy(zero_copy_only=False)[base:offs[-1]].astype(np.int32),
                 lab.values.to_numpy(zero_copy_only=False)[base:offs[-1]].astype(np.int32))
        del table, tok, lab
        pa.default_memory_pool().release_unused()  # the decoded Arrow buffers: back to the OS, not pooled
        size = sum(a.nbytes for a in entry)
        while self._cache and self._cached + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= sum(a.nbytes for a in old)
        self._cache[g] = entry
        self._cached += size
        return entry

    def rows(self, global_rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """``{input_ids, labels}`` int32 arrays of these rows, in the order given (repeats allowed)."""
        global_rows = np.asarray(global_rows, dtype=np.int64)
        if len(global_rows) and (global_rows.min() < 0 or global_rows.max() >= self.num_rows):
            raise IndexError(f"row {int(global_rows.max())} out of range: {self.path} has {self.num_rows} rows")
        groups = np.searchsorted(self._starts, global_rows, side="right") - 1
        out: list[dict[str, np.ndarray] | None] = [None] * len(global_rows)
        for g in np.unique(groups):  # each needed row group once, then its rows
            offs, tok, lab = self._group(int(g))
            for j in np.flatnonzero(groups == g):
                i = int(global_rows[j] - self._starts[g])
                a, b = offs[i], offs[i + 1]
                out[j] = {"input_ids": tok[a:b].copy(), "labels": lab[a:b].copy()}
        return out


T = TypeVar("T")


class ReadAhead(Generic[T]):
    """``read(step)``, with step ``s + 1`` read in one background thread while step ``s`` runs.

    Calling it with ``step`` returns ``read(step)`` (the read-ahead result when it was for
    ``step``, else a read now) and starts ``read(step + 1)`` when ``step + 1 < end_step``. The
    value is the same either way (``read`` is a pure function of the step: the plan and the
    Parquet), so losses do not change and a resume at step ``k`` simply reads ``k`` now.
    ``read`` runs in one thread at a time (a :class:`RowReader` is not thread-safe): before
    reading in the caller's thread, an unused read-ahead is waited for. A read-ahead's error
    is raised by the call for its step, as a read then would raise it.
    """

    def __init__(self, read: Callable[[int], T], end_step: int):
        self._read, self.end_step = read, end_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmss-read-ahead")
        self._ahead: tuple[int, Future] | None = None  # (step, its read) in flight or done
        self.hits = 0  # calls answered by the read-ahead (tests, benchmarks)

    def __call__(self, step: int) -> T:
        ahead = self._ahead
        if ahead is not None and ahead[0] == step:
            self._ahead = None
            value = ahead[1].result()
            self.hits += 1
        else:  # a resume, a repeated or out-of-order step: read it here, once the thread is idle
            if ahead is not None:
                wait([ahead[1]])
            value = self._read(step)
        if step + 1 < self.end_step and (self._ahead is None or self._ahead[0] != step + 1):
            self._ahead = (step + 1, self._pool.submit(self._read, step + 1))
        return value


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Supervised (shifted) positions of a padded or packed batch: ``labels[:, 1:] != -100``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a padded batch (its attention mask) or of a packed one (all of them)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
