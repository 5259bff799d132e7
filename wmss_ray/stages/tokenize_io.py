"""Ray Data I/O of the tokenise phase (``stages.tokenize``): the corpus datasource, the sink that
writes ``tokenized/`` / ``validation/`` parts with their indexes and reject parts, and the
readers of what it wrote (``TokenizedDatasource``, ``read_tokenized``, ``count_rows``,
``read_extra``, ``read_validation_rows``).

Layout under the phase's ``out_dir``, one part per sink write task (``part-<task index>``, so a
retried task overwrites its own part): ``tokenized/`` (``TOKENIZED_COLUMNS``), ``validation/``
(``VALIDATION_COLUMNS``), their indexes ``_tokenize_index/`` / ``_validation_index/`` (``SPLIT_DIRS``),
a map stage's extra columns ``_extra_parts/`` (``EXTRA_DIR``), bad rows ``_rejects_parts/*.jsonl``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.datasource import Datasink, FileBasedDatasource

from wmss_ray.config.schema import DataConfig
from wmss_ray.data import rejects as R
from wmss_ray.data.corpus import READ_SCHEMA, Corpus, file_names, iter_file_rows
from wmss_ray.io import storage
from wmss_ray.io.files import write_parquet

TOKEN_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("truncated", pa.bool_()),
    ("validation", pa.bool_()),
    # kept for validation rows only (evaluation generates from them); None on training rows
    ("prompt_messages", READ_SCHEMA.field("prompt_messages").type),
    ("answer", pa.string()),
    ("reference", pa.string()),
    ("source_file", pa.string()),
    ("source_row", pa.int64()),
    ("reject_reason", pa.string()),
    ("reject_detail", pa.string()),
])
TOKENIZED_COLUMNS = ["sample_id", "input_ids", "labels"]
VALIDATION_COLUMNS = ["sample_id", "prompt_messages", "answer", "reference", "input_ids", "labels"]
SPLIT_DIRS = {"train": ("tokenized", "_tokenize_index"), "validation": ("validation", "_validation_index")}
#: Per-part side tables of the training rows: ``sample_id`` + a map stage's columns beyond
#: ``TOKEN_SCHEMA`` (the fused path's scores), same part names and row order as ``tokenized/``.
EXTRA_DIR = "_extra_parts"
# Logical CPUs reserved per read / write task: none. They are light (parse, I/O) next to the
# model work, and any reservation lets scorer actors that own every CPU starve them: with
# 1 scorer x 2 CPUs on a 2-CPU node a 0.25-CPU read task is never scheduled and the run hangs.
# Their concurrency stays bounded by the number of files and Ray Data's backpressure.
IO_TASK_CPUS = 0


class CorpusDatasource(FileBasedDatasource):
    """Streams corpus files as line-numbered ``READ_SCHEMA`` blocks of ``block_rows`` rows."""

    def __init__(self, corpus: Corpus, data: DataConfig, block_rows: int = 256):
        super().__init__(list(corpus.files))
        self.corpus, self.data, self.block_rows = corpus, data, block_rows

    def _open_input_source(self, filesystem, path, **open_args):
        if self.corpus.format == "jsonl":  # sequential stream; .gz inferred from the name
            return super()._open_input_source(filesystem, path, **open_args)
        return filesystem.open_input_file(path)  # Parquet / Arrow need random access

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        file, name = file_names(self.corpus, path)
        rows: list[dict[str, Any]] = []
        for rec in iter_file_rows(f, file, name, self.corpus.format, self.corpus.schema, self.data, self.block_rows):
            if rec["reject_reason"] and self.data.on_bad_row == "error":
                raise R.bad_row_error(file, rec["source_row"], rec["reject_reason"], rec["reject_detail"])
            rows.append(rec)
            if len(rows) >= self.block_rows:
                yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


class TokenizedSink(Datasink):
    """Splits ``TOKEN_SCHEMA`` blocks: good rows to ``tokenized/``, bad rows to reject parts of
    at least ``rows_per_file`` rows each (``data.rows_per_file``: fewer, larger Parquet files)."""

    def __init__(self, out_dir: str, rows_per_file: int = 8192):
        self.out_dir = out_dir
        self.rows_per_file = rows_per_file
        self.returns: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, Any]:
        tables = [b for b in blocks if b.num_rows]
        counts: dict[str, Any] = {"rows_in": 0, "rows_ok": 0, "rows_truncated": 0, "rejected": {}}
        if not tables:
            return counts
        t = pa.concat_tables(tables)
        part = f"part-{ctx.task_idx:06d}"
        ok = pc.is_null(t["reject_reason"])
        good, bad = t.filter(ok), t.filter(pc.invert(ok))
        counts.update(rows_in=t.num_rows, rows_ok=good.num_rows,
                      rows_truncated=int(pc.sum(good["truncated"].cast(pa.int64())).as_py() or 0),
                      rejected=dict(Counter(bad["reject_reason"].to_pylist())))
        is_val = pc.fill_null(good["validation"], False)
        for split, rows, columns in (("train", good.filter(pc.invert(is_val)), TOKENIZED_COLUMNS),
                                     ("validation", good.filter(is_val), VALIDATION_COLUMNS)):
            if not rows.num_rows:
                continue
            data_dir, index_dir = SPLIT_DIRS[split]
            write_part(rows.select(columns), storage.join(self.out_dir, data_dir, part + ".parquet"))
            index = pa.table({
                "sample_id": rows["sample_id"], "source_file": rows["source_file"],
                "source_row": rows["source_row"], "part": pa.array([part] * rows.num_rows),
                "pos": pa.array(np.arange(rows.num_rows, dtype=np.int32)),
                "n_tokens": pc.list_value_length(rows["input_ids"]).cast(pa.int32()),
                "truncated": rows["truncated"],
            })
            write_part(index, storage.join(self.out_dir, index_dir, part + ".parquet"))
            extra = [c for c in rows.column_names if c not in TOKEN_SCHEMA.names]
            if split == "train" and extra:
                write_part(rows.select(["sample_id", *extra]), storage.join(self.out_dir, EXTRA_DIR, part + ".parquet"))
        if bad.num_rows:
            R.write_reject_part(storage.join(self.out_dir, "_rejects_parts", part + ".jsonl"), (
                R.reject_record(r["sample_id"], r["source_file"], r["source_row"], r["reject_reason"], r["reject_detail"])
                for r in bad.to_pylist()))
        return counts

    def on_write_complete(self, write_result) -> None:
        self.returns = [r for r in write_result.write_returns if r]


#: Target Parquet row-group size: training ranks read tokenised rows one row group at a time
#: (``training.dataset.RowReader``), so a group is the I/O unit of a random row.
ROW_GROUP_BYTES = 4 * 2**20


def write_part(table: pa.Table, uri: str) -> None:
    """One part of ``tokenized/`` (or of its index), in row groups of about ``ROW_GROUP_BYTES``."""
    write_parquet(table, uri, row_group_bytes=ROW_GROUP_BYTES)


def read_dir(uri: str, columns: list[str] | None = None) -> pa.Table:
    parts = storage.list_files(uri, ".parquet")
    if not parts:
        return pa.table({c: pa.array([], type=pa.string()) for c in (columns or ["sample_id"])})
    fs, _ = storage.resolve_fs(uri)
    return pa.concat_tables([pq.read_table(storage.resolve_fs(p)[1], columns=columns, filesystem=fs) for p in parts])

class TokenizedDatasource(FileBasedDatasource):
    """Streams ``tokenized/`` parquet parts as blocks of ``block_rows`` rows.

    Small, even blocks (not one block per part) let an actor pool share the work evenly and
    keep the work lost to a killed actor small.
    """

    def __init__(self, path: str, block_rows: int, columns: list[str] | None = None):
        super().__init__(path, file_extensions=["parquet"])
        self.block_rows, self.columns = block_rows, columns or TOKENIZED_COLUMNS

    def _open_input_source(self, filesystem, path, **open_args):
        return filesystem.open_input_file(path)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=self.block_rows, columns=self.columns):
            yield pa.Table.from_batches([batch])


def read_tokenized(path: str, block_rows: int = 256) -> "ray.data.Dataset":
    """The tokenised corpus as a Ray Dataset of ``{sample_id, input_ids, labels}`` rows."""
    return ray.data.read_datasource(TokenizedDatasource(path, block_rows), num_cpus=IO_TASK_CPUS)


def count_rows(path: str) -> int:
    """Rows of a parquet directory from file footers only (no data read)."""
    fs, _ = storage.resolve_fs(path)
    return sum(pq.ParquetFile(storage.resolve_fs(p)[1], filesystem=fs).metadata.num_rows
               for p in storage.list_files(path, ".parquet"))


def read_extra(out_dir: str) -> pa.Table:
    """The ``_extra_parts/`` side table a map stage with extra columns left (training rows)."""
    return read_dir(storage.join(out_dir, EXTRA_DIR))


def read_validation_rows(path: str) -> list[dict[str, Any]]:
    """The carved validation split as normalised rows ``{sample_id, prompt_messages, answer,
    reference}`` (small: a share of the corpus), in part and row order."""
    table = read_dir(path, ["sample_id", "prompt_messages", "answer", "reference"])
    return table.to_pylist() if table.num_rows else []
