"""The run's file formats, each read and written in one place: JSON lines and Parquet.

Paths are local paths or storage URIs; every byte goes through :mod:`wmss_ray.io.storage`, so a
run on object storage reads and writes the same files as a local one.

- :func:`read_jsonl` / :func:`write_jsonl`: one JSON object per line (``eval_<name>.jsonl``,
  ``rejects.jsonl`` and its parts, validation rows, the demo corpus). NaN is written and read
  as Python's ``json`` does.
- :func:`read_metrics`: a training phase's ``metrics.jsonl``, sorted by step.
- :func:`write_parquet`: one Parquet file, optionally in row groups of about a given size.

Layer: io; imports only pyarrow, the standard library and ``wmss_ray.io.storage``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from wmss_ray.io import storage


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in file order (blank lines skipped)."""
    return [json.loads(line) for line in storage.read_text(str(uri)).splitlines() if line.strip()]


def write_jsonl(uri: str, records: Iterable[Mapping[str, Any]], ensure_ascii: bool = True) -> None:
    """Write ``records`` as a whole JSON-lines file (parents created; tmp + move where the fs
    allows). ``ensure_ascii`` as in ``json.dumps``."""
    storage.write_text(str(uri), "".join(json.dumps(dict(r), ensure_ascii=ensure_ascii) + "\n" for r in records))


def read_metrics(uri: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (NaN allowed), sorted by step."""
    return sorted(read_jsonl(uri), key=lambda m: m.get("step", 0))


def write_parquet(table: pa.Table, uri: str, row_group_bytes: int | None = None) -> None:
    """Write ``table`` to the Parquet file ``uri`` (its directory must exist).

    ``row_group_bytes``: row groups of about that many bytes of ``table`` (at least one row);
    None: pyarrow's default.
    """
    fs, path = storage.resolve_fs(str(uri))
    rows_per_group = None
    if row_group_bytes is not None:
        rows_per_group = max(1, row_group_bytes * max(1, table.num_rows) // max(1, table.nbytes))
    pq.write_table(table, path, filesystem=fs, row_group_size=rows_per_group)
