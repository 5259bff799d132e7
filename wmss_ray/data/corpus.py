"""Corpus discovery, schema normalisation and line-numbered streaming reads (plain + Ray Data).

Formats: JSONL (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``), Parquet, and HF
``datasets`` directories written by ``save_to_disk`` (Arrow IPC files listed in
``state.json``); a single file or a directory of shards; a local path or any URI pyarrow
understands (``file://``, ``s3://``, ``gs://``).

Schemas (``data.schema``; ``auto`` decides once per corpus from its columns / first row):

- ``messages``: ``{<messages_column>: [{role, content}, ...]}``; the last assistant message is
  the answer, everything before it (system message included) is the prompt; turns after it
  are dropped (they cannot condition the answer).
- ``prompt_response``: ``{<prompt_column>: str, <response_column>: str}``; the prompt becomes
  one user message.

Every row becomes ``{sample_id, prompt_messages, answer, source_file, source_row,
reject_reason, reject_detail}``: a good row has ``reject_reason = None``; a bad row keeps its
place with a reason (see ``data.rejects``) so it is counted, never lost. ``sample_id`` is
``str(row[data.id_column])`` or, without an id column, ``"<file relative to corpus root>:<row>"``
(e.g. ``"train.jsonl:17"``), and travels through every later phase.

This module is Ray-free and sits below ``data.ray_corpus`` (which imports it, never the other
way round; the Ray Data tokenisation is ``data.ray_corpus.tokenize_corpus``). Its Ray Data
side, ``data.ray_corpus.CorpusDatasource``, streams each
file through the same row generator, :func:`iter_file_rows`, that the Ray-free
:func:`iter_corpus` (tests, the benchmark's plain loop) uses; see docs/SCORING.md for why a
custom datasource rather than ``read_json`` / ``read_text``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from wmss_ray.config.schema import DataConfig
from wmss_ray.data import rejects as R
from wmss_ray.io import storage

READ_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("prompt_messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("answer", pa.string()),
    ("reference", pa.string()),  # data.reference_column's value (None when unset or missing)
    ("source_file", pa.string()),
    ("source_row", pa.int64()),
    ("reject_reason", pa.string()),
    ("reject_detail", pa.string()),
])
_JSONL_EXT = (".jsonl", ".json", ".ndjson")
_PARQUET_EXT = (".parquet", ".pq")
_READ_CHUNK = 1 << 20  # bytes per JSONL read; lines are split out of these chunks


@dataclass(frozen=True)
class Corpus:
    """A discovered corpus: its format, schema and files (as URIs/paths ``ray.data`` accepts)."""

    uri: str
    format: str  # "jsonl" | "parquet" | "hf"
    files: tuple[str, ...]
    root: str  # directory the derived sample ids are relative to (path inside the filesystem)
    scheme: str  # "s3://" etc. ("" for local), prefixed to paths in messages and rejects
    schema: str = "auto"  # "messages" | "prompt_response" once detected


def _visible(rel: str) -> bool:
    return not any(part.startswith(("_", ".")) for part in rel.split("/"))


def _fmt_of(name: str) -> str | None:
    n = name.lower().removesuffix(".gz")
    if n.endswith(_JSONL_EXT):
        return "jsonl"
    if n.endswith(_PARQUET_EXT):
        return "parquet"
    if n.endswith(".arrow"):
        return "hf"
    return None


def discover_corpus(uri: str, fmt: str = "auto") -> Corpus:
    """Find the files of a corpus and its format (``fmt`` other than "auto" forces it).

    Raises:
        CorpusError: path missing, no readable files, mixed formats, or an HF DatasetDict.
    """
    fs, path = storage.resolve_fs(uri)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise R.CorpusError(f"corpus not found: {uri}")
    if info.type == pafs.FileType.File:
        found = fmt if fmt != "auto" else _fmt_of(path)
        if found is None:
            raise R.CorpusError(f"{uri}: unknown corpus file type; use .jsonl(.gz), .parquet or "
                                "an HF save_to_disk directory, or set data.format")
        return Corpus(uri, found, (uri,), posixpath.dirname(path), scheme)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    if "dataset_dict.json" in names:
        splits = sorted(n for n in names if not n.endswith(".json"))
        raise R.CorpusError(f"{uri} is an HF DatasetDict with splits {splits}; point data.train at one "
                            f"split directory, e.g. {storage.join(uri, splits[0] if splits else 'train')}")
    if fmt in ("auto", "hf") and "state.json" in names:
        with fs.open_input_stream(posixpath.join(path, "state.json")) as f:
            state = json.loads(f.read())
        files = tuple(storage.join(uri, d["filename"]) for d in state.get("_data_files", []))
        if not files:
            raise R.CorpusError(f"{uri}/state.json lists no _data_files")
        return Corpus(uri, "hf", files, path, scheme)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    by_fmt: dict[str, list[str]] = {}
    for i in infos:
        rel = posixpath.relpath(i.path, path)
        kind = _fmt_of(i.base_name)
        if i.type == pafs.FileType.File and _visible(rel) and kind and (fmt == "auto" or kind == fmt):
            by_fmt.setdefault(kind, []).append(storage.join(uri, rel))
    if not by_fmt:
        raise R.CorpusError(f"{uri}: no corpus files found (.jsonl, .jsonl.gz, .parquet, or an HF "
                            "save_to_disk directory with state.json)")
    if len(by_fmt) > 1:
        raise R.CorpusError(f"{uri}: mixed file formats {sorted(by_fmt)}; set data.format to pick one")
    (kind, files), = by_fmt.items()
    return Corpus(uri, kind, tuple(sorted(files)), path, scheme)


# ----------------------------------------------------------------------------- schema


def _first_keys(corpus: Corpus) -> list[str]:
    """Column names of the corpus: file schema (Parquet / Arrow) or the first JSON object."""
    fs, path = storage.resolve_fs(corpus.files[0])
    if corpus.format == "parquet":
        with fs.open_input_file(path) as f:
            return list(pq.read_schema(f).names)
    if corpus.format == "hf":
        with fs.open_input_file(path) as f:
            return list(_arrow_reader(f).schema.names)
    with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
        for _, raw in _iter_lines(f):
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict):
                return list(obj)
    return []


def detect_schema(corpus: Corpus, data: DataConfig) -> Corpus:
    """The corpus with ``schema`` set: as configured, or detected from its columns."""
    if data.schema_ != "auto":
        return Corpus(**{**corpus.__dict__, "schema": data.schema_})
    return Corpus(**{**corpus.__dict__, "schema": _schema_of(_first_keys(corpus), data, corpus.uri)})


def _schema_of(keys: list[str], data: DataConfig, where: str) -> str:
    if data.messages_column in keys:
        return "messages"
    if data.prompt_column in keys and data.response_column in keys:
        return "prompt_response"
    raise R.CorpusError(
        f"{where}: cannot tell the row schema from columns {keys}: expected "
        f"'{data.messages_column}' (chat) or '{data.prompt_column}' + '{data.response_column}'; "
        "set data.messages_column / prompt_column / response_column or data.schema"
    )


# ----------------------------------------------------------------------------- rows


def _text(value: Any, what: str, allow_empty: bool = False) -> str:
    if value is None:
        raise R.RowError(R.MISSING_FIELD, f"{what} is missing")
    if not isinstance(value, str):
        raise R.RowError(R.WRONG_TYPE, f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise R.RowError(R.EMPTY_FIELD, f"{what} is empty")
    return value


def normalize_row(obj: Any, schema: str, data: DataConfig) -> tuple[list[dict[str, str]], str]:
    """A raw row -> ``(prompt_messages [{role, content}], answer)``; raises ``RowError``."""
    if not isinstance(obj, Mapping):
        raise R.RowError(R.WRONG_TYPE, f"row must be a JSON object, got {type(obj).__name__}")
    if schema == "prompt_response":
        prompt = _text(obj.get(data.prompt_column), f"'{data.prompt_column}'")
        answer = _text(obj.get(data.response_column), f"'{data.response_column}'")
        return [{"role": "user", "content": prompt}], answer
    msgs = obj.get(data.messages_column)
    col = f"'{data.messages_column}'"
    if msgs is None:
        raise R.RowError(R.MISSING_FIELD, f"{col} is missing")
    if not isinstance(msgs, list):
        raise R.RowError(R.WRONG_TYPE, f"{col} must be a list of {{role, content}}, got {type(msgs).__name__}")
    if not msgs:
        raise R.RowError(R.EMPTY_FIELD, f"{col} is empty")
    clean = []
    for k, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise R.RowError(R.WRONG_TYPE, f"{col}[{k}] must be an object, got {type(m).__name__}")
        clean.append({"role": _text(m.get("role"), f"{col}[{k}].role"),
                      "content": _text(m.get("content"), f"{col}[{k}].content", allow_empty=True)})
    last = max((k for k, m in enumerate(clean) if m["role"] == "assistant"), default=None)
    if last is None:
        raise R.RowError(R.NO_ANSWER, f"{col} has no assistant message")
    if not clean[last]["content"].strip():
        raise R.RowError(R.EMPTY_FIELD, f"{col}[{last}] (the answer) is empty")
    if last == 0:
        raise R.RowError(R.EMPTY_PROMPT, "nothing precedes the assistant answer")
    return clean[:last], clean[last]["content"]


def _sample_id(obj: Any, data: DataConfig, default: str) -> str:
    if data.id_column is None:
        return default
    value = obj.get(data.id_column) if isinstance(obj, Mapping) else None
    if value is None:
        raise R.RowError(R.MISSING_FIELD, f"id column '{data.id_column}' is missing")
    if isinstance(value, (dict, list, float)) or isinstance(value, bool):
        raise R.RowError(R.WRONG_TYPE, f"id column '{data.id_column}' must be a string or integer")
    if not str(value).strip():
        raise R.RowError(R.EMPTY_FIELD, f"id column '{data.id_column}' is empty")
    return str(value)


def _record(obj: Any, schema: str, data: DataConfig, file: str, name: str, row: int,
            extra_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """One output record; a bad row keeps its place with its reason.

    ``extra_columns``: raw columns a good record also carries, under ``"extra"`` (None when
    absent), e.g. evaluation's ``final_answer``; the Ray Data path passes none.
    """
    default_id = f"{name}:{row}"
    sample_id = default_id
    try:
        sample_id = _sample_id(obj, data, default_id)
        prompt, answer = normalize_row(obj, schema, data)
    except R.RowError as e:
        return _bad(sample_id, file, row, e)
    ref = obj.get(data.reference_column) if data.reference_column else None
    rec = {"sample_id": sample_id, "prompt_messages": prompt, "answer": answer,
           "reference": None if ref is None else str(ref), "source_file": file,
           "source_row": row, "reject_reason": None, "reject_detail": None}
    if extra_columns:
        rec["extra"] = {c: obj.get(c) for c in extra_columns}
    return rec


def _bad(sample_id: str, file: str, row: int, e: R.RowError) -> dict[str, Any]:
    return {"sample_id": sample_id, "prompt_messages": None, "answer": None, "reference": None, "source_file": file,
            "source_row": row, "reject_reason": e.reason, "reject_detail": e.detail}


def _iter_lines(f) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, raw bytes)`` for every line of a binary stream, read in chunks."""
    buf, line_no = b"", 0
    while True:
        chunk = f.read(_READ_CHUNK)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line_no += 1
            yield line_no, line
    if buf:
        yield line_no + 1, buf


def _arrow_reader(f):
    """HF ``save_to_disk`` writes Arrow IPC streams; accept the IPC file format as well."""
    try:
        return pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        return pa.ipc.open_file(f)


def _arrow_batches(f, fmt: str, block_rows: int) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(f).iter_batches(batch_size=block_rows)
        return
    reader = _arrow_reader(f)
    batches = reader if hasattr(reader, "__iter__") else (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        for start in range(0, batch.num_rows, block_rows):
            yield batch.slice(start, block_rows)


def iter_file_rows(f, file: str, name: str, fmt: str, schema: str, data: DataConfig,
                   block_rows: int = 256, extra_columns: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Records of one opened file (binary stream for JSONL, random-access file otherwise).

    ``file`` names the file in messages; ``name`` is its part of derived sample ids.
    Blank JSONL lines are not rows (JSON Lines tolerates them) and are skipped.
    """
    if fmt == "jsonl":
        for line_no, raw in _iter_lines(f):
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield _bad(f"{name}:{line_no}", file, line_no, R.RowError(R.INVALID_UTF8, str(e)))
                continue
            except ValueError as e:
                yield _bad(f"{name}:{line_no}", file, line_no, R.RowError(R.MALFORMED_JSON, str(e)))
                continue
            yield _record(obj, schema, data, file, name, line_no, extra_columns)
        return
    row = 0
    for batch in _arrow_batches(f, fmt, block_rows):
        for obj in batch.to_pylist():
            yield _record(obj, schema, data, file, name, row, extra_columns)
            row += 1


def _open(fs: pafs.FileSystem, path: str, fmt: str):
    if fmt == "jsonl":
        return fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None)
    return fs.open_input_file(path)


def file_names(corpus: Corpus, path: str) -> tuple[str, str]:
    """``(file as shown in messages, name used in derived sample ids)`` of a resolved path."""
    rel = posixpath.relpath(path, corpus.root) if path.startswith(corpus.root.rstrip("/") + "/") else None
    return corpus.scheme + path, rel or posixpath.basename(path)


def iter_corpus(corpus: Corpus, data: DataConfig, extra_columns: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Every record of a corpus, in file and row order, without Ray (evaluation, tests, loops).

    Under ``data.on_bad_row: error`` the first bad row raises ``CorpusError``; under ``skip``
    bad records are yielded with their ``reject_reason`` (the caller counts them).
    """
    for uri in corpus.files:
        fs, path = storage.resolve_fs(uri)
        file, name = file_names(corpus, path)
        with _open(fs, path, corpus.format) as f:
            for rec in iter_file_rows(f, file, name, corpus.format, corpus.schema, data,
                                      extra_columns=extra_columns):
                if rec["reject_reason"] and data.on_bad_row == "error":
                    raise R.bad_row_error(file, rec["source_row"], rec["reject_reason"], rec["reject_detail"])
                yield rec


def iter_row_records(rows: list[Mapping[str, Any]], data: DataConfig, name: str = "rows",
                     extra_columns: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Records of in-memory raw rows, by the same rules as a file called ``name``.

    Schema as configured or detected from the first row's keys; rows are numbered from 0 (as
    in a Parquet file), so derived ids are ``"<name>:<row>"``; the same bad-row policy.
    """
    keys = list(rows[0]) if rows and isinstance(rows[0], Mapping) else []
    schema = data.schema_ if data.schema_ != "auto" else _schema_of(keys, data, name)
    for i, obj in enumerate(rows):
        rec = _record(obj, schema, data, name, name, i, extra_columns)
        if rec["reject_reason"] and data.on_bad_row == "error":
            raise R.bad_row_error(name, i, rec["reject_reason"], rec["reject_detail"])
        yield rec


def open_corpus(uri: str, data: DataConfig) -> Corpus:
    """``discover_corpus`` + ``detect_schema`` in one call."""
    return detect_schema(discover_corpus(uri, data.format), data)

