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

import pyarrow as pa
import pyarrow.compute as pc
import ray

from wmss_ray.cluster import ensure_ray
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data import rejects as R
from wmss_ray.io import storage
from wmss_ray.io.files import write_parquet
from wmss_ray.stages.scorer import SCORE_COLUMNS, EntropyScorer
from wmss_ray.stages.tokenize import count_rows, read_tokenized

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
        "chunk_size": s.chunk_size, "trust_remote_code": cfg.models.trust_remote_code,
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
    }, indent=2, sort_keys=True))
    return ScoringResult(scores_path, counts, elapsed, manifest, tokenized_path)
