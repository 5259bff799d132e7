"""Paired statistics for comparing two models on the same problems, and spread across seeds.

Two models evaluated on the same held-out problems give paired outcomes ``(a_i, b_i)`` in
{0, 1}. Treating the two accuracies as independent samples throws the pairing away and
overstates the noise, so the project reports:

* the exact McNemar test: under H0 (no difference) each discordant pair (only A right, or only
  B right) is a fair coin, so ``only_a ~ Binomial(only_a + only_b, 1/2)``; two-sided p-value
  ``min(1, 2 * P[X <= min(only_a, only_b)])``. Exact with integers up to ``_EXACT_MAX``
  discordant pairs, in log space beyond (relative error ~1e-12);
* a paired bootstrap CI for ``acc_a - acc_b``: resample problem indices with replacement
  (a seeded generator), take the mean per-problem difference, report percentiles.

No scipy: ``math.comb`` / ``math.lgamma`` and numpy only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np

# Above this many discordant pairs the exact big-integer sum gets slow; switch to log space.
_EXACT_MAX = 1000


@dataclass
class PairedTest:
    """Result of :func:`paired_test` (A vs B on the same ``n`` problems)."""

    name_a: str
    name_b: str
    n: int
    acc_a: float
    acc_b: float
    diff: float  # acc_a - acc_b
    both: int  # both right
    only_a: int  # A right, B wrong
    only_b: int  # A wrong, B right
    neither: int
    p_value: float  # exact McNemar, two-sided
    ci_low: float  # paired bootstrap CI of diff
    ci_high: float
    ci_level: float
    n_boot: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _log_binom_cdf_half(k: int, n: int) -> float:
    """log P[X <= k] for X ~ Binomial(n, 1/2), by log-sum-exp over lgamma terms."""
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)
    ]
    top = max(log_terms)
    return top + math.log(sum(math.exp(t - top) for t in log_terms)) - n * math.log(2.0)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    ``only_a``: problems A solves and B does not; ``only_b``: the reverse. With no discordant
    pairs there is no evidence either way: p = 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    if n <= _EXACT_MAX:
        tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
        return float(min(Fraction(1), 2 * tail))
    return min(1.0, 2.0 * math.exp(_log_binom_cdf_half(k, n)))


def paired_bootstrap_ci(
    correct_a: Sequence[bool] | np.ndarray,
    correct_b: Sequence[bool] | np.ndarray,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of ``mean(a) - mean(b)`` by resampling problems (pairs kept together).

    Shapes: ``correct_a``, ``correct_b`` [n] bools. Deterministic for a given ``seed``.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n == 0:
        return (float("nan"), float("nan"))
    d = a - b
    rng = np.random.default_rng(seed)
    # Chunk the [n_boot, n] index matrix so memory stays bounded on large eval sets.
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_test(
    correct_a: Sequence[bool],
    correct_b: Sequence[bool],
    name_a: str = "A",
    name_b: str = "B",
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedTest:
    """McNemar + paired bootstrap for two aligned outcome vectors ([n] bools each)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    n = int(a.shape[0])
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    lo, hi = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed, level=level)
    acc_a = float(a.mean()) if n else float("nan")
    acc_b = float(b.mean()) if n else float("nan")
    return PairedTest(
        name_a=name_a,
        name_b=name_b,
        n=n,
        acc_a=acc_a,
        acc_b=acc_b,
        diff=acc_a - acc_b,
        both=int(np.sum(a & b)),
        only_a=only_a,
        only_b=only_b,
        neither=int(np.sum(~a & ~b)),
        p_value=mcnemar_exact(only_a, only_b),
        ci_low=lo,
        ci_high=hi,
        ci_level=level,
        n_boot=n_boot,
        seed=seed,
    )


def paired_test_per_sample(
    per_sample_a: Iterable[dict],
    per_sample_b: Iterable[dict],
    name_a: str = "A",
    name_b: str = "B",
    **kwargs,
) -> PairedTest:
    """:func:`paired_test` on two per-sample lists (``{"sample_id", "correct", ...}``).

    Pairs by ``sample_id`` (the order of ``per_sample_a``); problems present in only one list
    are dropped, so ``n`` is the number of shared problems.
    """
    b_by_id = {str(r["sample_id"]): bool(r["correct"]) for r in per_sample_b}
    ca, cb = [], []
    for r in per_sample_a:
        sid = str(r["sample_id"])
        if sid in b_by_id:
            ca.append(bool(r["correct"]))
            cb.append(b_by_id[sid])
    return paired_test(ca, cb, name_a=name_a, name_b=name_b, **kwargs)


def mean_and_spread(values: Iterable[float]) -> tuple[float, float, float, float]:
    """``(mean, std, min, max)`` of a metric across seeds.

    ``std`` is the sample standard deviation (ddof=1): the seeds are a sample of possible runs.
    One value gives std 0.0; none gives all-NaN.
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        nan = float("nan")
        return (nan, nan, nan, nan)
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return (float(v.mean()), std, float(v.min()), float(v.max()))


#: Student's t 0.975 quantiles by degrees of freedom (2-sided 95 %), to 3 decimals; beyond 30 the
#: Cornish-Fisher expansion below is within 1e-3 of them.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile with ``df`` >= 1 degrees of freedom (table, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_t_ci(values: Iterable[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the 95 % t interval of the mean of ``values`` (e.g. per-seed paired
    differences: the seeds are the sample); one value gives NaN bounds, none all-NaN."""
    v = np.asarray(list(values), dtype=np.float64)
    nan = float("nan")
    if v.size == 0:
        return (nan, nan, nan)
    mean = float(v.mean())
    if v.size == 1:
        return (mean, nan, nan)
    half = t_quantile_975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return (mean, mean - half, mean + half)


_EXACT_FLIPS = 16  # up to 2**16 sign patterns are enumerated; beyond, a seeded Monte Carlo


def sign_flip_p_value(diffs: Sequence[float] | np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided paired randomisation test of ``mean(diffs) == 0``.

    Under H0 each problem's difference ``d_i`` (e.g. A's accuracy over seeds minus B's, in
    [-1, 1]) is as likely negated, so ``p = P[|sum s_i d_i| >= |sum d_i|]`` over random signs
    ``s``. For 0/1 outcomes (every ``d_i`` in {-1, 0, 1}) this is the exact McNemar test, computed
    as such at any size; otherwise exact over the ``m`` non-zero differences when ``m <= 16``, else
    a seeded Monte Carlo, ``(hits + 1) / (n_perm + 1)``.
    Shapes: ``diffs`` [n].
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    if np.all(np.abs(d) == 1.0):  # 0/1 outcomes: the same test, exact at any size
        return mcnemar_exact(int(np.sum(d > 0)), int(np.sum(d < 0)))
    observed = abs(float(d.sum())) - 1e-9 * float(np.abs(d).sum())  # ties count as extreme
    if d.size <= _EXACT_FLIPS:
        patterns = ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1) * 2 - 1  # [2^m, m]
        return float(np.mean(np.abs(patterns @ d) >= observed))
    rng = np.random.default_rng(seed)
    hits, chunk = 0, max(1, min(n_perm, 4_000_000 // d.size))
    for start in range(0, n_perm, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, n_perm - start), d.size)) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) >= observed))
    return (hits + 1) / (n_perm + 1)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one problem from ``n`` samples of which ``c`` are correct:
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def paired_sampled(per_sample_a: Iterable[dict], per_sample_b: Iterable[dict], k: int, name_a: str = "A",
                   name_b: str = "B", n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """avg@k and pass@k of A minus B on their shared problems (paired by ``sample_id``), each with a
    paired bootstrap CI over problems; both lists need ``sampled_correct`` (k bools per problem)."""
    b_by_id = {str(r["sample_id"]): r for r in per_sample_b}
    pairs = [(r, b_by_id[str(r["sample_id"])]) for r in per_sample_a if str(r["sample_id"]) in b_by_id]
    out: dict[str, Any] = {"name_a": name_a, "name_b": name_b, "k": k, "n": len(pairs), "ci_level": level}
    for metric, per_problem in (("avg_at_k", lambda c: c / k), ("pass_at_k", lambda c: pass_at_k(k, c, k))):
        a = np.array([per_problem(sum(ra.get("sampled_correct") or [])) for ra, _ in pairs], dtype=np.float64)
        b = np.array([per_problem(sum(rb.get("sampled_correct") or [])) for _, rb in pairs], dtype=np.float64)
        lo, hi = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed, level=level)
        out[metric] = {"a": float(a.mean()) if len(a) else float("nan"), "b": float(b.mean()) if len(b) else float("nan"),
                       "diff": float((a - b).mean()) if len(a) else float("nan"), "ci_low": lo, "ci_high": hi}
    return out


def calibration(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """How well ``confidence [n]`` in [0, 1] predicts ``correct [n]``.

    ``brier``: mean ``(confidence - correct)^2``; ``ece``: the expected calibration error over
    ``bins`` equal-width bins of confidence (``[0, 0.1), ..., [0.9, 1.0]``: the last one closed),
    ``sum_b n_b / n * |accuracy_b - mean confidence_b|``; ``bins``: the reliability diagram's
    points ``{low, high, n, confidence, accuracy}`` of the non-empty bins.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.shape != hit.shape or conf.ndim != 1:
        raise ValueError(f"confidence and correct must be two [n] sequences, got {conf.shape} and {hit.shape}")
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidence must lie in [0, 1]")
    if not conf.size:
        return {"brier": float("nan"), "ece": float("nan"), "bins": []}
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    points, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            c, a = float(conf[mask].mean()), float(hit[mask].mean())
            ece += mask.sum() / conf.size * abs(a - c)
            points.append({"low": b / bins, "high": (b + 1) / bins, "n": int(mask.sum()), "confidence": c, "accuracy": a})
    return {"brier": float(np.mean((conf - hit) ** 2)), "ece": float(ece), "bins": points}
