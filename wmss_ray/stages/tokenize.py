"""Ray Data side of the corpus: streaming read -> tokenise -> ``tokenized/`` parquet, once.

Pipeline (streaming; the corpus is never collected in the driver)::

    CorpusDatasource (one read task per file, line-numbered blocks of ``block_rows``)
      -> map_batches(TokenizeBatch, ActorPool: the tokenizer is loaded once per actor)
      -> write_datasink(TokenizedSink): good rows -> tokenized/part-*.parquet
                                        bad rows  -> _rejects_parts/*.jsonl, counted

The datasource, the sink and the readers of its outputs are in ``stages.tokenize_io``.
Outputs under ``out_dir``: ``tokenized/`` (``sample_id, input_ids, labels``; int32 lists),
``rejects.jsonl``, ``tokenize_manifest.json`` and ``_tokenize_index/`` (``sample_id,
source_file, source_row, part, pos, n_tokens`` per kept row: the small table the driver uses to
find duplicate ids without reading the tokens). With ``data.validation_fraction`` > 0 the rows
whose ``sample_id`` hashes into the validation split (``data.splits.in_validation``) go to
``validation/`` instead (``sample_id, prompt_messages, answer, reference, input_ids, labels``,
index ``_validation_index/``): never into ``tokenized/``, so training cannot see them.

``tokenize_corpus`` takes another map stage (``MapStage``) in place of ``TokenizeBatch``: the
fused tokenise-and-score path (``stages.score.tokenize_and_score``) passes one whose actors also
score each block; columns beyond ``TOKEN_SCHEMA`` are written for the training rows to
``_extra_parts/`` (same part names and row order as ``tokenized/``), deduplicated with them.

Bad rows travel as rows with a ``reject_reason`` until the sink, so a row can only leave the
pipeline by being written to one of the two outputs; ``rows_in == rows_ok + rows_rejected``
is checked at the end. Sink parts are named by write-task index, so a retried task overwrites
its own part (no duplicates after a failure).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from wmss_ray.cluster import ensure_ray
from wmss_ray.config.schema import DataConfig, WMSSConfig
from wmss_ray.data import rejects as R
from wmss_ray.data.corpus import open_corpus
from wmss_ray.io import storage
from wmss_ray.stages.tokenize_io import (
    EXTRA_DIR,
    IO_TASK_CPUS,
    SPLIT_DIRS,
    TOKEN_SCHEMA,
    CorpusDatasource,
    TokenizedSink,
    read_dir,
    read_validation_rows,
    write_part,
)


class TokenizeBatch:
    """Ray Data UDF: ``READ_SCHEMA`` table -> ``TOKEN_SCHEMA`` table (one tokenizer per actor)."""

    def __init__(self, tokenizer_path: str, data: DataConfig, trust_remote_code: bool = False):
        from wmss_ray.models.loading import load_tokenizer

        self.tok = load_tokenizer(tokenizer_path, trust_remote_code)
        self.data = data

    def __call__(self, table: pa.Table) -> pa.Table:
        from wmss_ray.data.chat_tokens import BadRowError, tokenize_example
        from wmss_ray.data.splits import in_validation

        out = []
        for rec in table.to_pylist():
            row = {k: rec[k] for k in ("sample_id", "source_file", "source_row", "reject_reason", "reject_detail")}
            row["input_ids"] = row["labels"] = row["truncated"] = None
            row["validation"] = in_validation(rec["sample_id"], self.data.validation_fraction)
            if row["validation"]:
                row.update({k: rec[k] for k in ("prompt_messages", "answer", "reference")})
            if row["reject_reason"] is None:
                try:
                    t = tokenize_example(self.tok, rec["prompt_messages"], rec["answer"],
                                         self.data.max_seq_len, self.data.truncation, self.data.supervise)
                    row["input_ids"], row["labels"], row["truncated"] = t["input_ids"], t["labels"], t["truncated"]
                except BadRowError as e:
                    if e.reason == "no_chat_template":  # a property of the model, not of a row
                        raise
                    detail = str(e).removeprefix(f"{e.reason}: ")
                    if self.data.on_bad_row == "error":
                        raise R.bad_row_error(rec["source_file"], rec["source_row"], e.reason, detail) from None
                    row["reject_reason"], row["reject_detail"] = e.reason, detail
            out.append(row)
        return pa.Table.from_pylist(out, schema=TOKEN_SCHEMA)


def _drop_duplicates(out_dir: str, on_bad_row: str, split: str = "train") -> list[dict[str, Any]]:
    """Keep each sample_id's first occurrence (by file, row); returns reject records of the rest.

    Reads only the small index table; rewrites only the parts that held a duplicate (and their
    ``_extra_parts/`` twins). The splits are by sample_id, so duplicates never cross them and each
    split is deduplicated on its own.
    """
    data_dir, index_dir = SPLIT_DIRS[split]
    idx_dir = storage.join(out_dir, index_dir)
    index = read_dir(idx_dir)
    if index.num_rows == 0:
        return []
    index = index.sort_by([("sample_id", "ascending"), ("source_file", "ascending"), ("source_row", "ascending")])
    ids = index["sample_id"].to_numpy(zero_copy_only=False)
    dup = np.zeros(len(ids), dtype=bool)
    dup[1:] = ids[1:] == ids[:-1]
    if not dup.any():
        return []
    rows = index.to_pylist()
    first = {}
    records = []
    for r, d in zip(rows, dup):
        if not d:
            first[r["sample_id"]] = r
            continue
        f = first[r["sample_id"]]
        detail = f"sample_id {r['sample_id']!r} already at {R.location(f['source_file'], f['source_row'])}"
        if on_bad_row == "error":
            raise R.bad_row_error(r["source_file"], r["source_row"], R.DUPLICATE_SAMPLE_ID, detail)
        records.append({**R.reject_record(r["sample_id"], r["source_file"], r["source_row"],
                                          R.DUPLICATE_SAMPLE_ID, detail), "_part": r["part"], "_pos": r["pos"]})
    drop: dict[str, set[int]] = {}
    for rec in records:
        drop.setdefault(rec.pop("_part"), set()).add(rec.pop("_pos"))
    fs, _ = storage.resolve_fs(out_dir)
    for part, positions in drop.items():
        extra = storage.join(out_dir, EXTRA_DIR, part + ".parquet")
        for sub in (data_dir, index_dir, *((EXTRA_DIR,) if split == "train" and storage.exists(extra) else ())):
            uri = storage.join(out_dir, sub, part + ".parquet")
            t = pq.read_table(storage.resolve_fs(uri)[1], filesystem=fs)
            keep = np.ones(t.num_rows, dtype=bool)
            keep[list(positions)] = False
            write_part(t.filter(pa.array(keep)), uri)
    return records


@dataclass(frozen=True)
class MapStage:
    """The actor pool between read and sink: a Ray Data UDF class taking ``READ_SCHEMA`` blocks
    (one read block per call) to ``TOKEN_SCHEMA`` blocks, plus any extra columns."""

    udf: type
    kwargs: dict[str, Any]
    compute: Any  # ray.data.ActorPoolStrategy
    num_cpus: float
    num_gpus: float | None = None
    # Cut the read into blocks of exactly this many rows (the last one shorter) before the map,
    # whatever blocks Ray's read made: a UDF that scores each block gets the same batches on
    # every cluster. None: Ray's blocks (tokenising is per row, blocks do not matter).
    exact_block_rows: int | None = None


def tokenize_stage(cfg: WMSSConfig, tokenizer_path: str) -> MapStage:
    """The tokenize phase's own stage: ``TokenizeBatch`` on 1..``data.tokenize_actors`` actors."""
    return MapStage(TokenizeBatch, {"tokenizer_path": tokenizer_path, "data": cfg.data,
                                    "trust_remote_code": cfg.models.trust_remote_code},
                    ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.data.tokenize_actors), cfg.data.tokenize_cpus)


@dataclass
class TokenizeResult:
    tokenized_path: str
    rejects_path: str
    manifest_path: str
    counts: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    validation_path: str | None = None  # the carved validation split (None without one)


def tokenize_corpus(cfg: WMSSConfig, tokenizer_path: str, corpus: str, out_dir: str,
                    block_rows: int | None = None, stage: MapStage | None = None) -> TokenizeResult:
    """Stream ``corpus`` through normalisation and the chat template into ``out_dir/tokenized``.

    Args:
        tokenizer_path: a local HF directory with the tokenizer (the model's own).
        block_rows: rows per read block (default ``cfg.scoring.batch_size``).
        stage: the map stage (default ``tokenize_stage``); extra columns it adds land in
            ``out_dir/_extra_parts/`` for the training rows.

    Returns:
        ``TokenizeResult``; ``counts = {rows_in, rows_ok, rows_rejected, rejected_by_reason}``.

    Raises:
        CorpusError: under ``data.on_bad_row: error``, naming file, row and reason of a bad row.
    """
    t0 = time.perf_counter()
    ensure_ray()
    data = cfg.data
    c = open_corpus(corpus, data)
    for sub in ("tokenized", "_tokenize_index", "validation", "_validation_index", "_rejects_parts", EXTRA_DIR):
        storage.reset_dir(storage.join(out_dir, sub))
    stage = stage or tokenize_stage(cfg, tokenizer_path)
    ds = ray.data.read_datasource(CorpusDatasource(c, data, block_rows or cfg.scoring.batch_size),
                                  num_cpus=IO_TASK_CPUS)
    if stage.exact_block_rows:
        ds = ds.repartition(target_num_rows_per_block=stage.exact_block_rows, strict=True)
        # Its tasks only slice and concatenate blocks: no CPU reserved, as IO_TASK_CPUS says why
        # (ray 2.60's repartition takes no ray_remote_args; the op's dict is read at planning).
        ds._logical_plan.dag.ray_remote_args["num_cpus"] = IO_TASK_CPUS
    ds = ds.map_batches(
        stage.udf, fn_constructor_kwargs=stage.kwargs,
        batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
        compute=stage.compute, num_cpus=stage.num_cpus, num_gpus=stage.num_gpus or None,
    )
    # Blocks reach the sink in read order, not in the order actors finish, so the same corpus
    # always gives the same parts (row order, part boundaries): scoring batches, and with them
    # the scores' last bits, then do not depend on scheduling.
    ds.context.execution_options.preserve_order = True
    sink = TokenizedSink(out_dir, data.rows_per_file)
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    except Exception as e:  # Ray wraps task errors; surface ours with its own message
        err = R.find_corpus_error(e)
        if err is not None:
            raise err from None
        raise
    dup_records = _drop_duplicates(out_dir, data.on_bad_row) + _drop_duplicates(out_dir, data.on_bad_row, "validation")
    rejects_path = storage.join(out_dir, "rejects.jsonl")
    by_reason = R.merge_rejects(storage.join(out_dir, "_rejects_parts"), dup_records, rejects_path)
    storage.reset_dir(storage.join(out_dir, "_rejects_parts"))
    rows_in = sum(r["rows_in"] for r in sink.returns)
    train_index = read_dir(storage.join(out_dir, "_tokenize_index"), ["sample_id", "truncated"])
    val_index = read_dir(storage.join(out_dir, "_validation_index"), ["sample_id", "truncated"])
    kept, n_val = train_index.num_rows, val_index.num_rows
    n_trunc = sum(int(pc.sum(t["truncated"].cast(pa.int64())).as_py() or 0)
                  for t in (train_index, val_index) if t.num_rows)
    # rows_ok: the training rows; rows_validation: held out by data.validation_fraction.
    counts = {"rows_in": rows_in, "rows_ok": kept, "rows_validation": n_val, "rows_truncated": n_trunc,
              "rows_rejected": sum(by_reason.values()), "rejected_by_reason": dict(sorted(by_reason.items()))}
    if rows_in != kept + n_val + counts["rows_rejected"]:  # a row vanished or was duplicated: a bug
        raise RuntimeError(f"row accounting broken: rows_in {rows_in} != kept {kept} + validation {n_val} "
                           f"+ rejected {counts['rows_rejected']}")
    elapsed = time.perf_counter() - t0
    manifest = storage.join(out_dir, "tokenize_manifest.json")
    storage.write_text(manifest, json.dumps({
        "phase": "tokenize", "status": "completed", "corpus": corpus, "format": c.format,
        "schema": c.schema, "files": len(c.files), "tokenizer": tokenizer_path,
        "max_seq_len": data.max_seq_len, "truncation": data.truncation, "on_bad_row": data.on_bad_row,
        "supervise": data.supervise, "validation_fraction": data.validation_fraction,
        "validation": storage.join(out_dir, "validation") if n_val else None,
        "config_hash": cfg.config_hash(), "counts": counts, "elapsed_s": round(elapsed, 3),
    }, indent=2, sort_keys=True))
    return TokenizeResult(storage.join(out_dir, "tokenized"), rejects_path, manifest, counts, elapsed,
                          storage.join(out_dir, "validation") if n_val else None)

def validation_eval_input(cfg: WMSSConfig, outputs: dict[str, dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    """What ``evaluation.evaluate_models`` takes for the validation split: the carved split's
    normalised rows (read here: a parquet directory the eval reader does not know), else the
    corpus path; None without a validation split."""
    from wmss_ray.data.splits import validation_source

    source = validation_source(cfg, outputs)
    if source is not None and source == outputs.get("tokenize", {}).get("validation"):
        return read_validation_rows(source)
    return source
