"""Paired tests against hand-computed small cases."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from wmss_ray.stages import stats


@pytest.mark.parametrize(
    "only_a, only_b, expected",
    [
        (0, 0, 1.0),  # no discordant pairs: no evidence
        (1, 0, 1.0),  # n=1: 2 * 1/2
        (5, 0, 2 / 32),  # 2 * (1/2)^5
        (0, 5, 2 / 32),  # symmetric
        (6, 1, 2 * (1 + 7) / 128),  # 2 * (C(7,0)+C(7,1)) / 2^7
        (10, 2, 2 * (1 + 12 + 66) / 4096),
        (3, 3, 1.0),  # capped at 1
    ],
)
def test_mcnemar_exact_hand_cases(only_a, only_b, expected):
    assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_log_space_matches_exact():
    n = 900
    for k in (0, 10, 300, 440, 450):
        exact = float(Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n))
        logged = math.exp(stats._log_binom_cdf_half(k, n))
        assert logged == pytest.approx(exact, rel=1e-9, abs=1e-300)
    # Above the exact threshold the log-space branch is used and stays in [0, 1].
    p = stats.mcnemar_exact(1100, 1000)
    assert 0.0 < p < 1.0
    assert stats.mcnemar_exact(1050, 1050) == 1.0


def test_mcnemar_rejects_negative():
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 2)


def test_paired_test_counts_and_ci():
    # 10 problems: both right on 4, only A on 3, only B on 1, neither on 2.
    a = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    b = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0]
    r = stats.paired_test(a, b, name_a="WMSS", name_b="SFT", n_boot=2000, seed=3)
    assert (r.n, r.both, r.only_a, r.only_b, r.neither) == (10, 4, 3, 1, 2)
    assert r.acc_a == pytest.approx(0.7) and r.acc_b == pytest.approx(0.5)
    assert r.diff == pytest.approx(0.2)
    assert r.p_value == pytest.approx(2 * (1 + 4) / 16)  # n=4 discordant, k=1
    assert r.ci_low <= r.diff <= r.ci_high
    assert -1.0 <= r.ci_low and r.ci_high <= 1.0
    # Seeded: the same seed gives the same CI.
    again = stats.paired_test(a, b, n_boot=2000, seed=3)
    assert (again.ci_low, again.ci_high) == (r.ci_low, r.ci_high)
    assert r.to_dict()["name_a"] == "WMSS"


def test_bootstrap_degenerate_cases():
    assert stats.paired_bootstrap_ci([1, 1, 0], [1, 1, 0], n_boot=100) == (0.0, 0.0)
    assert stats.paired_bootstrap_ci([1, 1, 1], [0, 0, 0], n_boot=100) == (1.0, 1.0)
    with pytest.raises(ValueError):
        stats.paired_bootstrap_ci([1, 0], [1], n_boot=10)


def test_paired_test_per_sample_aligns_by_id():
    a = [{"sample_id": "x", "correct": True}, {"sample_id": "y", "correct": False},
         {"sample_id": "only_a", "correct": True}]
    b = [{"sample_id": "y", "correct": True}, {"sample_id": "x", "correct": True}]
    r = stats.paired_test_per_sample(a, b, n_boot=50)
    assert r.n == 2
    assert (r.both, r.only_a, r.only_b, r.neither) == (1, 0, 1, 0)


def test_mean_and_spread():
    assert stats.mean_and_spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0, 1.0, 3.0))
    assert stats.mean_and_spread([0.5]) == (0.5, 0.0, 0.5, 0.5)
    assert all(math.isnan(x) for x in stats.mean_and_spread([]))


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (3, 0), (5, 5), (9, 2), (1, 7), (12, 4)])
def test_sign_flip_on_0_1_outcomes_is_the_exact_mcnemar_test(only_a, only_b):
    d = np.array([1.0] * only_a + [-1.0] * only_b + [0.0] * 7)  # the concordant problems carry no sign
    assert stats.sign_flip_p_value(d) == pytest.approx(stats.mcnemar_exact(only_a, only_b), rel=1e-12)
    if only_a + only_b:  # the enumeration of every sign pattern (the general path) agrees
        signs = np.array(np.meshgrid(*[[-1, 1]] * (only_a + only_b))).reshape(only_a + only_b, -1).T
        nz = d[d != 0]
        assert np.mean(np.abs(signs @ nz) >= abs(nz.sum()) - 1e-12) == pytest.approx(
            stats.mcnemar_exact(only_a, only_b), rel=1e-12)


def test_sign_flip_monte_carlo_agrees_with_the_exact_test_and_is_seeded():
    rng = np.random.default_rng(3)
    d = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=14, p=[0.15, 0.15, 0.2, 0.2, 0.3])  # mean over 2 seeds
    exact = stats.sign_flip_p_value(d)
    big = np.tile(d, 3)  # 42 non-zero-ish values: past the exact limit
    mc = stats.sign_flip_p_value(big, n_perm=20000, seed=1)
    assert mc == stats.sign_flip_p_value(big, n_perm=20000, seed=1)
    # the naive reference: enumerate all 2^m patterns of d directly
    nz = d[d != 0]
    signs = np.array(np.meshgrid(*[[-1, 1]] * nz.size)).reshape(nz.size, -1).T
    ref = np.mean(np.abs(signs @ nz) >= abs(nz.sum()) - 1e-12)
    assert exact == pytest.approx(ref, rel=1e-12)
    many = rng.normal(0.02, 0.3, 400)
    ref_mc = np.mean(np.abs((rng.integers(0, 2, (40000, 400)) * 2 - 1) @ many) >= abs(many.sum()))
    assert stats.sign_flip_p_value(many, n_perm=20000, seed=2) == pytest.approx(ref_mc, abs=0.01)
    assert 0.0 < mc <= 1.0


def test_pass_at_k_equals_the_combinatorial_definition():
    """1 - C(n-c, k) / C(n, k), the probability that k of the n samples drawn without replacement
    hold a correct one, for every n <= 12, c, k."""
    from math import comb

    from wmss_ray.stages.stats import pass_at_k

    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_paired_sampled_differences_and_ci():
    from wmss_ray.stages.stats import paired_sampled, pass_at_k

    rng = np.random.default_rng(0)
    k = 4
    a = [{"sample_id": f"s{i}", "sampled_correct": list(rng.random(k) < 0.6)} for i in range(40)]
    b = [{"sample_id": f"s{i}", "sampled_correct": list(rng.random(k) < 0.3)} for i in reversed(range(40))]
    p = paired_sampled(a, b, k, "A", "B", n_boot=2000, seed=1)
    by_id = {r["sample_id"]: r for r in b}
    avg_diff = np.mean([sum(r["sampled_correct"]) / k - sum(by_id[r["sample_id"]]["sampled_correct"]) / k for r in a])
    pass_diff = np.mean([pass_at_k(k, sum(r["sampled_correct"]), k)
                         - pass_at_k(k, sum(by_id[r["sample_id"]]["sampled_correct"]), k) for r in a])
    assert p["n"] == 40 and p["k"] == k
    assert p["avg_at_k"]["diff"] == pytest.approx(avg_diff)
    assert p["pass_at_k"]["diff"] == pytest.approx(pass_diff)
    assert p["avg_at_k"]["ci_low"] < avg_diff < p["avg_at_k"]["ci_high"]


def test_calibration_brier_ece_and_bins_equal_their_definitions():
    rng = np.random.default_rng(0)
    conf = rng.random(500)
    conf[:5] = [0.0, 1.0, 0.1, 0.95, 0.5]  # bin edges: 1.0 falls in the last bin, 0.1 in the second
    hit = rng.random(500) < conf
    out = stats.calibration(conf, hit, bins=10)
    assert out["brier"] == pytest.approx(float(np.mean((conf - hit) ** 2)))
    ece, n = 0.0, 0
    for b in range(10):  # naive: each bin by its own comparison
        lo, hi = b / 10, (b + 1) / 10
        members = [(c, h) for c, h in zip(conf, hit) if lo <= c < hi or (b == 9 and c == 1.0)]
        if members:
            n += len(members)
            ece += len(members) / 500 * abs(np.mean([h for _, h in members]) - np.mean([c for c, _ in members]))
    assert n == 500 and out["ece"] == pytest.approx(ece)
    assert sum(p["n"] for p in out["bins"]) == 500 and out["bins"][-1]["high"] == 1.0
    perfect = stats.calibration([1.0, 0.0, 1.0], [True, False, True])
    assert perfect["brier"] == 0.0 and perfect["ece"] == 0.0
    with pytest.raises(ValueError):
        stats.calibration([1.5], [True])


def test_t_quantile_matches_the_table_and_the_expansion_continues_it():
    # the table's own values, and the expansion against known quantiles beyond it (to 1e-3)
    assert stats.t_quantile_975(1) == 12.706 and stats.t_quantile_975(2) == 4.303
    for df, known in ((40, 2.021), (60, 2.000), (120, 1.980), (10_000, 1.960)):
        assert abs(stats.t_quantile_975(df) - known) < 1.5e-3
    assert abs(stats.t_quantile_975(31) - 2.040) < 1.5e-3  # continuous at the table's end
    with pytest.raises(ValueError):
        stats.t_quantile_975(0)


def test_mean_t_ci_is_the_t_interval_of_the_seeds():
    v = [0.1, 0.3, 0.2]
    mean, lo, hi = stats.mean_t_ci(v)
    half = 4.303 * np.std(v, ddof=1) / math.sqrt(3)
    assert mean == pytest.approx(0.2) and lo == pytest.approx(0.2 - half) and hi == pytest.approx(0.2 + half)
    one = stats.mean_t_ci([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(x) for x in stats.mean_t_ci([]))
