"""The curriculum stage (2A): entropy-based sampling weights, a seeded draw, both written out.

The math (pure numpy) first: ``sampling_weights``, ``sample_indices``, ``weight_summary``; then
the phase (Ray-free), ``sample_curriculum``, which reads ``scores.parquet`` (``sample_id, h_weak,
h_strong, ...``, sorted by sample_id) and writes into the phase's directory ``weights.parquet``
(``sample_id, weight, draws``: the weights the draw used, float64, sum 1, and how often each
sample was drawn; the report reads these, so a change of ``curriculum.*`` is never described by
stale numbers) and ``sampled_ids.parquet`` (``sample_id`` with repeats, in draw order; training
reads it). Weights are computed here, not at scoring time: scores depend only on the two models
and the corpus, weights also on ``curriculum.*``.

``dH_i = H_strong,i - H_weak,i``. Two weightings:

- ``"seed"`` (default; the method card and the reference code), each term normalised on its
  own so alpha, beta, gamma are shares of the sampling mass::

      p_i = a * H_weak,i / sum(H_weak) + b * [-dH_i]+ / sum([-dH]+) + c * [dH_i]+ / sum([dH]+)

- ``"v2"`` (paper v2, eq. 9): ``p_i ∝ a * [-dH_i]+ + b * H_strong,i + c * [dH_i]+``.

A term whose denominator is 0 is dropped; if every term drops (e.g. all entropies 0) the weights
are uniform. Never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.files import write_parquet

FORMULAS = ("seed", "v2")
NORMALIZE = ("per_term",)


def _as_array(x, name: str) -> np.ndarray:
    """List / numpy / torch (any device) -> 1-D float64 numpy, validated finite and >= 0."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    if np.any(arr < 0):
        raise ValueError(f"{name} contains negative values (entropies are >= 0)")
    return arr


def _check_coef(value, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n, dtype=np.float64)


def sampling_weights(
    h_weak,
    h_strong,
    alpha: float,
    beta: float,
    gamma: float,
    formula: str = "seed",
    normalize: str = "per_term",
) -> np.ndarray:
    """Curriculum sampling weights.

    Args:
        h_weak, h_strong: ``[N]`` per-sample entropies (list, numpy or torch), finite, >= 0.
        alpha, beta, gamma: term coefficients, >= 0 and not all 0.
        formula: ``"seed"`` or ``"v2"`` (see the module docstring).
        normalize: ``"per_term"`` (the only mode; applies to ``"seed"``, ``"v2"`` has none).

    Returns:
        ``[N]`` float64 numpy weights, non-negative, summing to 1.
    """
    hw = _as_array(h_weak, "h_weak")
    hs = _as_array(h_strong, "h_strong")
    if hw.shape != hs.shape:
        raise ValueError(f"h_weak and h_strong differ in length: {hw.size} vs {hs.size}")
    coefs = np.array([_check_coef(alpha, "alpha"), _check_coef(beta, "beta"), _check_coef(gamma, "gamma")])
    if not coefs.any():
        raise ValueError("alpha, beta and gamma are all 0; at least one must be > 0")
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    # Both formulas are invariant to a common scale of the coefficients; scaling by the max
    # keeps huge coefficients from overflowing.
    coefs = coefs / coefs.max()
    dh = hs - hw  # finite: both are in [0, max float]
    drop, rise = np.maximum(-dh, 0.0), np.maximum(dh, 0.0)

    if formula == "seed":
        p = np.zeros_like(hw)
        for coef, term in zip(coefs, (hw, drop, rise)):
            top = term.max()
            if coef > 0 and top > 0:  # zero denominator (all-zero term) -> drop the term
                scaled = term / top  # in [0, 1]: the sum cannot overflow
                p += coef * scaled / scaled.sum()
    else:
        top = max(hs.max(), np.abs(dh).max())
        if top == 0:
            return _uniform(hw.size)
        p = coefs[0] * drop / top + coefs[1] * hs / top + coefs[2] * rise / top

    total = p.sum()
    if not total > 0:  # every term dropped
        return _uniform(hw.size)
    return p / total


def sample_indices(weights, n: int, seed: int, dedup: bool = False) -> np.ndarray:
    """Draw ``n`` indices with replacement, ``P(i) = weights[i] / sum(weights)``.

    Reproducible: a numpy ``Generator`` seeded with ``seed``. ``dedup=True`` keeps the unique
    indices in first-draw order (fewer than ``n`` in general).

    Returns:
        ``[n]`` (or fewer with dedup) int64 numpy indices.
    """
    w = _as_array(weights, "weights")
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    top = w.max()
    if not top > 0:
        raise ValueError("weights sum to 0")
    p = w / top  # in [0, 1] first: the sum of huge weights cannot overflow
    rng = np.random.default_rng(seed)
    idx = rng.choice(w.size, size=int(n), replace=True, p=p / p.sum()).astype(np.int64)
    if dedup:
        _, first = np.unique(idx, return_index=True)
        idx = idx[np.sort(first)]
    return idx


def weight_summary(weights, draws) -> dict[str, float]:
    """What a curriculum draw did, as the curriculum phase's manifest and the report state it.

    Args:
        weights: ``[N]`` sampling weights (any non-negative scale).
        draws: ``[N]`` integer counts, how often each sample was drawn.

    Returns:
        ``{"effective_sample_size": (Σw)²/Σw² (N for uniform, 1 when one sample holds all mass),
        "max_draws_per_sample": max(draws), "samples_drawn": #(draws > 0), "draws": Σdraws}``.
    """
    w = _as_array(weights, "weights")
    d = np.asarray(draws, dtype=np.int64)
    if d.shape != w.shape:
        raise ValueError(f"weights and draws differ in shape: {w.shape} vs {d.shape}")
    p = w / w.max() if w.max() > 0 else w  # scale-free; avoids overflow of the squares
    sq = float((p ** 2).sum())
    return {
        "effective_sample_size": float(p.sum() ** 2 / sq) if sq > 0 else float("nan"),
        "max_draws_per_sample": int(d.max()),
        "samples_drawn": int((d > 0).sum()),
        "draws": int(d.sum()),
    }


# ----------------------------------------------------------------------------- the phase

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
    storage.make_dir(out_dir)
    write_parquet(pa.table({"sample_id": scores["sample_id"].take(pa.array(idx))}), sampled_path)
    write_parquet(pa.table({"sample_id": scores["sample_id"], "weight": pa.array(weights, pa.float64()),
                     "draws": pa.array(per_sample, pa.int64())}), weights_path)
    counts = {"rows_scored": n, **weight_summary(weights, per_sample)}
    return CurriculumResult(sampled_path, weights_path, counts)
