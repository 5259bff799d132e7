"""Bad rows: reason codes, the two errors, and the merged ``rejects.jsonl``.

A bad row never vanishes. Under ``data.on_bad_row: error`` (the default) the first one stops
the run with a :class:`CorpusError` naming file, row and reason; under ``skip`` it becomes one
line of ``<out_dir>/rejects.jsonl``::

    {"sample_id": "train.jsonl:3", "file": "/data/train.jsonl", "row": 3,
     "reason": "malformed_json", "detail": "Expecting ',' delimiter: line 1 column 12"}

and every run reports ``rows_in = rows_ok + rows_rejected`` with a per-reason breakdown.
``row`` is the 1-based line number for JSONL and the 0-based row index for Parquet / Arrow.

Paths may be local or any URI pyarrow understands (``file://``, ``s3://``, ``gs://``); every
read and write here goes through :mod:`wmss_ray.io.storage` (``pyarrow.fs``) so remote tasks and
the driver agree.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from wmss_ray.io.errors import UserError
from wmss_ray.io.files import read_jsonl, write_jsonl
from wmss_ray.io.storage import list_files

# Reason codes (machine-readable; the per-reason counts use these keys).
MALFORMED_JSON = "malformed_json"  # a JSONL line that is not JSON
INVALID_UTF8 = "invalid_utf8"  # a JSONL line that is not UTF-8
WRONG_TYPE = "wrong_type"  # e.g. messages not a list, content not a string, row not an object
MISSING_FIELD = "missing_field"  # messages / prompt / response / id column absent or null
EMPTY_FIELD = "empty_field"  # empty messages list, empty answer, empty id
NO_ANSWER = "no_answer"  # a chat row without an assistant message
EMPTY_PROMPT = "empty_prompt"  # nothing before the answer
TOO_LONG = "too_long"  # longer than data.max_seq_len under truncation: reject
EMPTY_ANSWER_AFTER_TRUNCATION = "empty_answer_after_truncation"
PROMPT_TRUNCATED_AWAY = "prompt_truncated_away"  # left truncation would keep none of the prompt
DUPLICATE_SAMPLE_ID = "duplicate_sample_id"  # a later occurrence of an id already seen
REASONS = (
    MALFORMED_JSON, INVALID_UTF8, WRONG_TYPE, MISSING_FIELD, EMPTY_FIELD, NO_ANSWER, EMPTY_PROMPT,
    TOO_LONG, EMPTY_ANSWER_AFTER_TRUNCATION, PROMPT_TRUNCATED_AWAY, DUPLICATE_SAMPLE_ID,
)
_DETAIL_CHARS = 300  # details are truncated so one pathological row cannot bloat the rejects


class RowError(ValueError):
    """One row is bad; ``reason`` is a code from :data:`REASONS`, ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:_DETAIL_CHARS]


class CorpusError(UserError, ValueError):
    """The corpus cannot be used as is (bad row under ``on_bad_row: error``, unknown layout)."""


def location(file: str, row: int) -> str:
    """``'train.jsonl line 3'`` for JSONL (1-based lines), ``'x.parquet row 0'`` otherwise."""
    unit = "line" if is_jsonl(file) else "row"
    return f"{file} {unit} {row}"


def bad_row_error(file: str, row: int, reason: str, detail: str) -> CorpusError:
    return CorpusError(
        f"bad row at {location(file, row)}: {reason}: {detail} "
        "(set data.on_bad_row: skip to write bad rows to rejects.jsonl and continue)"
    )


def is_jsonl(path: str) -> bool:
    p = path.lower()
    return p.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz"))


def find_corpus_error(exc: BaseException) -> CorpusError | None:
    """The CorpusError inside an exception Ray raised from a task (cause chain, then message)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CorpusError):
            # RayTaskError(CorpusError) subclasses CorpusError but carries a traceback dump as
            # its message; the original is kept as .cause.
            # Ray may append retry notes after the first line; our messages are one line.
            inner = getattr(e, "cause", None)
            text = str(inner if isinstance(inner, CorpusError) else e).strip()
            m = re.search(r"CorpusError: (.+)", text)
            return CorpusError(m.group(1).strip() if m else text.splitlines()[0])
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    # Actor task errors may reach the driver with the chain flattened into the traceback text.
    m = re.search(r"CorpusError: (.+)", str(exc))
    return CorpusError(m.group(1).strip()) if m else None


def reject_record(sample_id: str, file: str, row: int, reason: str, detail: str) -> dict[str, Any]:
    return {"sample_id": sample_id, "file": file, "row": int(row), "reason": reason, "detail": detail}


def write_reject_part(uri: str, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSONL part of rejects (written by a Ray write task; named per task, so a retried
    task overwrites its own part instead of adding a second copy)."""
    write_jsonl(uri, records, ensure_ascii=False)


def merge_rejects(parts_dir: str, extra: Iterable[Mapping[str, Any]], out_uri: str) -> Counter:
    """Concatenate the reject parts (+ ``extra`` records) into ``out_uri``, sorted by (file, row)
    so the file is the same whatever order tasks finished in. Returns counts per reason.

    Rejects are held in the driver to sort them: they are small (one short line per bad row).
    """
    records = list(extra)
    for part in list_files(parts_dir, ".jsonl"):
        records.extend(read_jsonl(part))
    records.sort(key=lambda r: (r["file"], r["row"], r["reason"]))
    write_jsonl(out_uri, records, ensure_ascii=False)
    return Counter(r["reason"] for r in records)
