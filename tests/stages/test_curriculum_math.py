"""Curriculum weights (both formulas) and seeded draws (DESIGN.md §1.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wmss_ray.stages.curriculum import sample_indices, sampling_weights

# Hand example: H_weak = [1, 2, 3, 2], H_strong = [2, 1, 3, 0]
#   dH        = [1, -1, 0, -2]
#   H_weak/8  = [1/8, 2/8, 3/8, 2/8]
#   [-dH]+/3  = [0, 1/3, 0, 2/3]
#   [dH]+/1   = [1, 0, 0, 0]
HW, HS = [1.0, 2.0, 3.0, 2.0], [2.0, 1.0, 3.0, 0.0]


def test_seed_formula_hand_example():
    # 0.1 * [1/8, 2/8, 3/8, 2/8] + 0.8 * [0, 1/3, 0, 2/3] + 0.1 * [1, 0, 0, 0]; sums to 1 already.
    expected = [0.0125 + 0.1, 0.025 + 0.8 / 3, 0.0375, 0.025 + 1.6 / 3]
    w = sampling_weights(HW, HS, 0.1, 0.8, 0.1)
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    # alpha=1, beta=1, gamma=0: [1/8, 2/8 + 1/3, 3/8, 2/8 + 2/3], sum 2 -> halved.
    expected = np.array([1 / 8, 2 / 8 + 1 / 3, 3 / 8, 2 / 8 + 2 / 3]) / 2
    np.testing.assert_allclose(sampling_weights(HW, HS, 1, 1, 0), expected, rtol=1e-12)


def test_v2_formula_hand_example():
    # 0.1 * [0, 1, 0, 2] + 0.8 * [2, 1, 3, 0] + 0.1 * [1, 0, 0, 0] = [1.7, 0.9, 2.4, 0.2]; sum 5.2
    expected = np.array([1.7, 0.9, 2.4, 0.2]) / 5.2
    np.testing.assert_allclose(sampling_weights(HW, HS, 0.1, 0.8, 0.1, formula="v2"), expected, rtol=1e-12)


def test_input_types_agree():
    ref = sampling_weights(np.array(HW), np.array(HS), 0.1, 0.8, 0.1)
    np.testing.assert_array_equal(sampling_weights(HW, HS, 0.1, 0.8, 0.1), ref)
    from_torch = sampling_weights(torch.tensor(HW), torch.tensor(HS, dtype=torch.float32), 0.1, 0.8, 0.1)
    np.testing.assert_array_equal(from_torch, ref)


def test_zero_denominators_drop_terms():
    h = [1.0, 3.0, 0.0, 4.0]
    # dH == 0 everywhere: both dH terms drop, only alpha's H_weak term is left.
    np.testing.assert_allclose(sampling_weights(h, h, 0.1, 0.8, 0.1), np.array(h) / 8)
    # ... and with alpha = 0 every term drops: uniform.
    np.testing.assert_allclose(sampling_weights(h, h, 0, 0.5, 0.5), [0.25] * 4)
    # H_weak all 0 (alpha term drops), all dH >= 0 (beta term drops): gamma's term alone.
    np.testing.assert_allclose(sampling_weights([0, 0, 0], [1, 0, 3], 0.1, 0.8, 0.1), [0.25, 0, 0.75])
    for formula in ("seed", "v2"):
        np.testing.assert_allclose(sampling_weights([0, 0], [0, 0], 1, 1, 1, formula=formula), [0.5, 0.5])
    # v2: only the beta * H_strong term is non-zero.
    np.testing.assert_allclose(sampling_weights(h, h, 0.1, 0.8, 0.1, formula="v2"), np.array(h) / 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"h_weak": [1.0, -0.1]}, "h_weak"),
        ({"h_strong": [1.0, float("nan")]}, "h_strong"),
        ({"h_strong": [1.0, float("inf")]}, "h_strong"),
        ({"h_strong": [1.0, 2.0, 3.0]}, "length"),
        ({"h_weak": [], "h_strong": []}, "h_weak"),
        ({"alpha": -0.1}, "alpha"),
        ({"gamma": float("nan")}, "gamma"),
        ({"alpha": 0, "beta": 0, "gamma": 0}, "all 0"),
        ({"formula": "v3"}, "formula"),
        ({"normalize": "global"}, "normalize"),
    ],
)
def test_validation_names_the_argument(kwargs, match):
    args = {"h_weak": [1.0, 2.0], "h_strong": [2.0, 1.0], "alpha": 0.1, "beta": 0.8, "gamma": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sampling_weights(**args)


# Degenerate magnitudes: zeros, subnormals, tiny, ordinary, huge and the largest float.
special = [0.0, 5e-324, 1e-300, 1e-8, 0.5, 1.0, 3.7, 1e8, 1e300, np.finfo(float).max]
entropy_values = st.sampled_from(special) | st.floats(0, 1e6)
coefs = st.tuples(st.floats(0, 1e300), st.floats(0, 1e300), st.floats(0, 1e300)).filter(lambda c: any(c))


@settings(max_examples=200, deadline=None)
@given(
    data=st.integers(1, 12).flatmap(lambda n: st.tuples(*[st.lists(entropy_values, min_size=n, max_size=n)] * 2)),
    c=coefs,
    formula=st.sampled_from(["seed", "v2"]),
)
def test_weights_are_a_distribution_property(data, c, formula):
    hw, hs = data
    w = sampling_weights(hw, hs, *c, formula=formula)
    assert w.shape == (len(hw),)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(value=entropy_values, n=st.integers(1, 10), formula=st.sampled_from(["seed", "v2"]))
def test_all_equal_inputs_give_uniform(value, n, formula):
    w = sampling_weights([value] * n, [value] * n, 0.1, 0.8, 0.1, formula=formula)
    np.testing.assert_allclose(w, np.full(n, 1.0 / n), rtol=1e-12)


def test_sample_indices_reproducible_and_follows_weights():
    w = sampling_weights(HW, HS, 0.1, 0.8, 0.1)
    a, b = sample_indices(w, 20000, seed=7), sample_indices(w, 20000, seed=7)
    assert a.dtype == np.int64 and a.shape == (20000,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_indices(w, 20000, seed=8))
    freq = np.bincount(a, minlength=4) / 20000
    np.testing.assert_allclose(freq, w, atol=0.02)  # deterministic given the seed
    # Zero-weight indices are never drawn; unnormalised and torch weights are accepted.
    c = sample_indices(torch.tensor([0.0, 5.0, 0.0, 5.0]), 500, seed=0)
    assert set(c.tolist()) == {1, 3}
    assert sample_indices(w, 0, seed=0).shape == (0,)


def test_sample_indices_dedup_keeps_first_draw_order():
    w = np.array([0.5, 0.3, 0.1, 0.1])
    full = sample_indices(w, 50, seed=3)
    dedup = sample_indices(w, 50, seed=3, dedup=True)
    first_seen = list(dict.fromkeys(full.tolist()))
    assert dedup.tolist() == first_seen and dedup.dtype == np.int64
    with pytest.raises(ValueError):
        sample_indices([0.0, 0.0], 5, seed=0)
    with pytest.raises(ValueError):
        sample_indices(w, -1, seed=0)


def test_weight_summary_against_naive():
    from wmss_ray.stages.curriculum import weight_summary

    rng = np.random.default_rng(7)
    w = rng.dirichlet(np.ones(40))
    draws = np.bincount(rng.choice(40, 60, p=w), minlength=40)
    s = weight_summary(w, draws)
    assert s["effective_sample_size"] == pytest.approx(sum(w) ** 2 / sum(x * x for x in w), rel=1e-12)
    assert s["max_draws_per_sample"] == max(draws) and s["draws"] == 60
    assert s["samples_drawn"] == sum(1 for d in draws if d > 0)
    # uniform weights: N; all mass on one sample: 1; scale-free
    assert weight_summary(np.ones(8), np.ones(8, int))["effective_sample_size"] == pytest.approx(8)
    assert weight_summary(np.eye(5)[2], np.eye(5, dtype=int)[2])["effective_sample_size"] == pytest.approx(1)
    assert weight_summary(w * 1e300, draws)["effective_sample_size"] == pytest.approx(s["effective_sample_size"])
    with pytest.raises(ValueError, match="differ in shape"):
        weight_summary(w, draws[:-1])
