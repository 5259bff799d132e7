"""The curriculum phase (2A): weights from the entropy scores, a seeded draw, both written out.

Ray-free. Reads ``scores.parquet`` (``sample_id, h_weak, h_strong, ...``, sorted by sample_id)
and writes, into the phase's directory:

- ``weights.parquet`` — ``sample_id, weight, draws``: the weights the draw used (float64, sum 1)
  and how often each sample was drawn. The report reads these, so a change of
  ``curriculum.*`` (a Tune trial, an ablation) is never described by stale numbers.
- ``sampled_ids.parquet`` — ``sample_id`` with repeats, in draw order (training reads it).

Weights are computed here, not at scoring time: scores depend only on the two models and the
corpus, weights also on ``curriculum.*``, and each file is fingerprinted by what it depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wmss_ray.config import WMSSConfig
from wmss_ray.core.curriculum import sample_indices, sampling_weights, weight_summary
from wmss_ray import storage

SAMPLED_IDS_FILE = "sampled_ids.parquet"
WEIGHTS_FILE = "weights.parquet"


@dataclass
class CurriculumResult:
    sampled_ids_path: str
    weights_path: str
    counts: dict[str, Any] = field(default_factory=dict)


def curriculum_weights(cfg: WMSSConfig, h_weak: np.ndarray, h_strong: np.ndarray) -> np.ndarray:
    """``[N]`` float64 sampling weights summing to 1 (uniform when the curriculum is off)."""
    c = cfg.curriculum
    if not c.enabled:
        return np.full(len(h_weak), 1.0 / len(h_weak))
    return sampling_weights(h_weak, h_strong, c.alpha, c.beta, c.gamma, c.formula, c.normalize)


def _write(table: pa.Table, uri: str) -> None:
    fs, path = storage.resolve_fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def sample_curriculum(cfg: WMSSConfig, scores_path: str, out_dir: str, seed: int) -> CurriculumResult:
    """Draw ``round(N * curriculum.sample_multiplier)`` sample ids with replacement (seeded).

    Weights follow *this* ``cfg.curriculum`` (uniform when ``enabled`` is false); ``dedup`` keeps
    first draws only. ``scores.parquet`` is sorted by sample_id, so the same (scores, cfg, seed)
    always gives the same draw.

    Returns:
        ``CurriculumResult``: ``out_dir/sampled_ids.parquet``, ``out_dir/weights.parquet`` and
        ``counts = {rows_scored, draws, samples_drawn, max_draws_per_sample,
        effective_sample_size}``.
    """
    fs, path = storage.resolve_fs(scores_path)
    scores = pq.read_table(path, columns=["sample_id", "h_weak", "h_strong"], filesystem=fs)
    n = scores.num_rows
    if n == 0:
        raise ValueError(f"{scores_path} holds no scores")
    weights = curriculum_weights(cfg, scores["h_weak"].to_numpy(), scores["h_strong"].to_numpy())
    draws = max(1, round(n * cfg.curriculum.sample_multiplier))
    idx = sample_indices(weights, draws, seed=seed, dedup=cfg.curriculum.dedup)
    per_sample = np.bincount(idx, minlength=n)
    sampled_path, weights_path = storage.join(out_dir, SAMPLED_IDS_FILE), storage.join(out_dir, WEIGHTS_FILE)
    _write(pa.table({"sample_id": scores["sample_id"].take(pa.array(idx))}), sampled_path)
    _write(pa.table({"sample_id": scores["sample_id"], "weight": pa.array(weights, pa.float64()),
                     "draws": pa.array(per_sample, pa.int64())}), weights_path)
    counts = {"rows_scored": n, **weight_summary(weights, per_sample)}
    return CurriculumResult(sampled_path, weights_path, counts)
