"""Distributed weak/strong entropy scoring with Ray Data (the pipeline's ``score_<t>`` phases).

``score_tokenized`` = pair check -> score the corpus ``tokenize_corpus`` wrote once (the
``tokenize`` phase; reused by training); the curriculum draw is ``stages/curriculum.py``::

    TokenizedDatasource (blocks of scoring.batch_size rows)
      -> map_batches(EntropyScorer, ActorPoolStrategy(size=scoring.num_actors),
                     batch_size=scoring.batch_size, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
      -> driver: iter_batches of the small score rows (N x 5 numbers; never the corpus)
      -> scores.parquet {sample_id, h_weak, h_strong, dh, n_answer_tokens} sorted by
         sample_id, + scoring_manifest.json (no curriculum weights: those depend on
         curriculum.*, which scoring does not, and are written by the curriculum phase)

``tokenize_and_score`` = the same two steps fused into one streaming execution, for when the
tokenised corpus is not there yet and the pair is known (the benchmark; a run whose M1 is given)::

    CorpusDatasource (blocks of scoring.batch_size rows)
      -> map_batches(TokenizeScoreBatch, the scoring pool): tokenise the block, then score its
         training rows as one batch (one actor pool, started once, instead of two)
      -> TokenizedSink: tokenized/ exactly as tokenize_corpus writes it, + the scores of the
         training rows in _extra_parts/ (deduplicated with tokenized/)
      -> driver: scores.parquet and both manifests, as the two steps write them

Fault tolerance: Ray Data's actor pool map defaults to ``max_restarts=-1`` and
``max_task_retries=-1`` (ray 2.60, ``ActorPoolMapOperator._apply_default_remote_args``), so a
killed scorer is restarted and its in-flight batch retried; the driver then checks that every
tokenised row got exactly one score.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from wmss_ray.cluster import ensure_ray
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data import rejects as R
from wmss_ray.io import storage
from wmss_ray.io.files import write_parquet
from wmss_ray.stages.scorer import SCORE_COLUMNS, EntropyScorer
from wmss_ray.stages.tokenize import MapStage, TokenizeBatch, TokenizeResult, tokenize_corpus
from wmss_ray.stages.tokenize_io import EXTRA_DIR, count_rows, read_extra, read_tokenized

SCORES_FILE = "scores.parquet"
log = logging.getLogger("wmss_ray.scoring")


@dataclass
class ScoringResult:
    scores_path: str
    counts: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    manifest_path: str | None = None
    tokenized_path: str | None = None


def scorer_kwargs(cfg: WMSSConfig, weak_model: str, strong_model: str) -> dict[str, Any]:
    s = cfg.scoring
    return {
        "weak_model": weak_model, "strong_model": strong_model,
        "device": "cuda" if s.gpus_per_actor > 0 else "cpu", "dtype": cfg.models.dtype,
        "chunk_size": s.chunk_size, "logits_mb": s.logits_mb, "trust_remote_code": cfg.models.trust_remote_code,
        "attn_implementation": cfg.models.attn_implementation,
        # On CPU an actor computes with as many threads as logical CPUs it reserved.
        "num_threads": max(1, int(s.cpus_per_actor)) if s.gpus_per_actor == 0 else None,
    }


def _warn_if_pool_cannot_fit(cfg: WMSSConfig) -> None:
    """A fixed pool larger than the cluster waits forever (unless an autoscaler adds nodes)."""
    s, have = cfg.scoring, ray.cluster_resources()
    for res, per in (("CPU", s.cpus_per_actor), ("GPU", s.gpus_per_actor)):
        if per and s.num_actors * per > have.get(res, 0):
            log.warning("scoring pool needs %g %s (%d actors x %g) but the cluster has %g; it will wait "
                        "for more nodes", s.num_actors * per, res, s.num_actors, per, have.get(res, 0))


def score_dataset(ds: "ray.data.Dataset", cfg: WMSSConfig, weak_model: str, strong_model: str,
                  scorer_cls: type = EntropyScorer) -> "ray.data.Dataset":
    """``{sample_id, input_ids, labels}`` rows -> score rows (``SCORE_COLUMNS``), lazily.

    ``scorer_cls``: ``EntropyScorer`` or a subclass (the benchmark adds per-batch timings).
    """
    s = cfg.scoring
    _warn_if_pool_cannot_fit(cfg)
    out = ds.map_batches(
        scorer_cls,
        fn_constructor_kwargs=scorer_kwargs(cfg, weak_model, strong_model),
        batch_size=s.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=s.num_actors),
        num_cpus=s.cpus_per_actor,
        num_gpus=s.gpus_per_actor or None,
        udf_modifying_row_count=False,
    )
    # Batches are cut from blocks in read order, not in arrival order: each sample is scored
    # in the same padded batch on every run, so the same seed gives bit-identical scores.
    out.context.execution_options.preserve_order = True
    return out


def score_tokenized(cfg: WMSSConfig, weak_model: str, strong_model: str, tokenized_path: str, out_dir: str,
                    progress_callback: Callable[[int], None] | None = None,
                    check_pair: bool = True) -> ScoringResult:
    """Score a tokenised corpus (``tokenize_corpus`` output) with both models; write scores.

    Args:
        progress_callback: called in the driver with the number of rows scored so far, after
            each batch of scores arrives (CLI progress, tests).

    Returns:
        ``ScoringResult`` with ``scores_path = out_dir/scores.parquet``; ``counts["rows_scored"]``.

    Raises:
        IncompatibleModelsError: weak and strong do not share the tokenizer and vocabulary.
        RuntimeError: a tokenised row got no score or more than one (never expected).
    """
    t0 = time.perf_counter()
    if check_pair:
        from wmss_ray.models.loading import check_pair_compatible

        check_pair_compatible(weak_model, strong_model, cfg.models.trust_remote_code)
    ensure_ray()
    ds = score_dataset(read_tokenized(tokenized_path, cfg.scoring.batch_size), cfg, weak_model, strong_model)
    tables, done = [], 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(batch.select(list(SCORE_COLUMNS)))
        done += batch.num_rows
        if progress_callback is not None:
            progress_callback(done)
    return _write_scores(cfg, weak_model, strong_model, tokenized_path, tables, out_dir, t0)


def _write_scores(cfg: WMSSConfig, weak_model: str, strong_model: str, tokenized_path: str,
                  tables: list[pa.Table], out_dir: str, t0: float, **manifest_extra: Any) -> ScoringResult:
    """Exactly-once check against ``tokenized_path``, then ``scores.parquet`` (sorted by
    ``sample_id``) and ``scoring_manifest.json``; ``tables`` hold ``SCORE_COLUMNS``."""
    expected = count_rows(tokenized_path)
    if not tables:
        raise R.CorpusError(f"{tokenized_path}: no rows to score")
    scores = pa.concat_tables(tables).sort_by("sample_id")
    n_unique = len(pc.unique(scores["sample_id"]))
    if scores.num_rows != expected or n_unique != expected:
        raise RuntimeError(f"scoring returned {scores.num_rows} scores ({n_unique} distinct ids) for "
                           f"{expected} tokenised rows")
    h_weak = scores["h_weak"].to_numpy()
    h_strong = scores["h_strong"].to_numpy()
    scores_path = storage.join(out_dir, SCORES_FILE)
    storage.make_dir(out_dir)
    write_parquet(scores, scores_path)
    elapsed = time.perf_counter() - t0
    counts = {"rows_scored": scores.num_rows,
              "mean_h_weak": float(h_weak.mean()), "mean_h_strong": float(h_strong.mean()),
              "frac_dh_negative": float((scores["dh"].to_numpy() < 0).mean())}
    manifest = storage.join(out_dir, "scoring_manifest.json")
    storage.write_text(manifest, json.dumps({
        "phase": "score", "status": "completed", "models": {"weak": weak_model, "strong": strong_model},
        "tokenized": tokenized_path, "config_hash": cfg.config_hash(), "counts": counts,
        "scoring": cfg.scoring.model_dump(),
        "elapsed_s": round(elapsed, 3), "samples_per_s": round(scores.num_rows / max(elapsed, 1e-9), 2),
        **manifest_extra,
    }, indent=2, sort_keys=True))
    return ScoringResult(scores_path, counts, elapsed, manifest, tokenized_path)


SCORE_TYPES = {"h_weak": pa.float64(), "h_strong": pa.float64(), "dh": pa.float64(), "n_answer_tokens": pa.int64()}


class TokenizeScoreBatch:
    """Ray Data UDF of the fused path: a ``READ_SCHEMA`` block -> ``TOKEN_SCHEMA`` + the score
    columns (``SCORE_TYPES``; null on rejected and validation rows, which are not scored).

    The block's training rows are scored as one padded batch; blocks are ``scoring.batch_size``
    consecutive corpus rows (``MapStage.exact_block_rows``), so the scores are those of a plain
    loop over the corpus in such batches, to the last bit, on any cluster
    (tests/stages/test_score.py). ``score_tokenized`` cuts its batches from Ray's blocks of
    ``tokenized/``: the same scores up to float rounding (padding never changes a score; 1e-5).
    """

    def __init__(self, tokenize_kwargs: dict[str, Any], scorer_kwargs: dict[str, Any],
                 scorer_cls: type = EntropyScorer):
        self.tokenize = TokenizeBatch(**tokenize_kwargs)
        self.scorer = scorer_cls(**scorer_kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        out = self.tokenize(table)
        train = pc.and_(pc.is_null(out["reject_reason"]), pc.invert(pc.fill_null(out["validation"], False)))
        rows = np.flatnonzero(train.to_numpy(zero_copy_only=False))  # [n] positions of the rows to score
        scored = out.take(pa.array(rows, type=pa.int64()))
        s = self.scorer.score_rows(scored["input_ids"].to_pylist(), scored["labels"].to_pylist()) if len(rows) else {}
        mask = np.ones(out.num_rows, dtype=bool)  # True: null (not scored)
        mask[rows] = False
        for name, typ in SCORE_TYPES.items():
            values = np.zeros(out.num_rows, dtype=typ.to_pandas_dtype())
            if len(rows):
                values[rows] = s[name]
            out = out.append_column(name, pa.array(values, type=typ, mask=mask))
        return out


def tokenize_and_score(cfg: WMSSConfig, tokenizer_path: str, corpus: str, tokenize_dir: str,
                       weak_model: str, strong_model: str, score_dir: str, check_pair: bool = True,
                       scorer_cls: type = EntropyScorer) -> tuple[TokenizeResult, ScoringResult]:
    """``tokenize_corpus`` then ``score_tokenized`` in one streaming execution on one actor pool.

    Writes what the two steps write (``tokenize_dir``: ``tokenized/``, rejects, validation,
    ``tokenize_manifest.json``; ``score_dir``: ``scores.parquet``, ``scoring_manifest.json``),
    with the same row accounting and exactly-once checks. The tokenising runs in the scoring
    actors (``scoring.num_actors`` x ``cpus_per_actor``/``gpus_per_actor``), not in
    ``data.tokenize_actors``. Both results' ``elapsed`` is the fused execution's time.

    Raises:
        IncompatibleModelsError: before any Ray work, as ``score_tokenized``.
        CorpusError: as ``tokenize_corpus``.
    """
    t0 = time.perf_counter()
    if check_pair:
        from wmss_ray.models.loading import check_pair_compatible

        check_pair_compatible(weak_model, strong_model, cfg.models.trust_remote_code)
    ensure_ray()
    _warn_if_pool_cannot_fit(cfg)
    s = cfg.scoring
    tokenize_kwargs = {"tokenizer_path": tokenizer_path, "data": cfg.data,
                       "trust_remote_code": cfg.models.trust_remote_code}
    stage = MapStage(TokenizeScoreBatch, {"tokenize_kwargs": tokenize_kwargs,
                                          "scorer_kwargs": scorer_kwargs(cfg, weak_model, strong_model),
                                          "scorer_cls": scorer_cls},
                     ray.data.ActorPoolStrategy(size=s.num_actors), s.cpus_per_actor, s.gpus_per_actor or None,
                     exact_block_rows=s.batch_size)  # each block's training rows: one scoring batch
    tok = tokenize_corpus(cfg, tokenizer_path, corpus, tokenize_dir, block_rows=s.batch_size, stage=stage)
    scores = read_extra(tokenize_dir).select(list(SCORE_COLUMNS))
    storage.reset_dir(storage.join(tokenize_dir, EXTRA_DIR))
    res = _write_scores(cfg, weak_model, strong_model, tok.tokenized_path, [scores] if scores.num_rows else [],
                        score_dir, t0, fused_with_tokenize=True)
    return tok, res


def scoring_key(cfg: WMSSConfig, weak_model: str, strong_model: str) -> str:
    """What ``tokenize_and_score``'s scores depend on beyond the corpus and its tokenising: scores
    made under an equal key are the scores of this pair (the pipeline's reuse test)."""
    return json.dumps({"weak": weak_model, "strong": strong_model, "batch_size": cfg.scoring.batch_size,
                       "scorer": scorer_kwargs(cfg, weak_model, strong_model), "path": "fused"}, sort_keys=True)


def reuse_scores(scores_path: str, out_dir: str) -> ScoringResult:
    """Copy scores that ``tokenize_and_score`` made (and their manifest) into ``out_dir``."""
    src_dir = scores_path.rsplit("/", 1)[0]
    storage.make_dir(out_dir)
    dst = storage.join(out_dir, SCORES_FILE)
    storage.write_bytes(dst, storage.read_bytes(scores_path))
    manifest = json.loads(storage.read_text(storage.join(src_dir, "scoring_manifest.json")))
    manifest["copied_from"] = scores_path
    manifest_path = storage.join(out_dir, "scoring_manifest.json")
    storage.write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    return ScoringResult(dst, manifest["counts"], 0.0, manifest_path, manifest["tokenized"])
