"""Splits by a hash of sample_id: the validation split and the seeded eval subsample."""

from __future__ import annotations

import random

import pytest

from wmss_ray.data.splits import hash_unit, in_validation, seeded_subsample


def test_validation_split_is_a_pure_function_of_the_id_with_the_right_share():
    ids = [f"row-{i}" for i in range(20000)]
    val = {i for i in ids if in_validation(i, 0.1)}
    assert 0.09 < len(val) / len(ids) < 0.11
    assert val == {i for i in reversed(ids) if in_validation(i, 0.1)}  # order does not matter
    # A larger fraction only adds rows (u < f is monotone in f); 0 carves nothing.
    assert val <= {i for i in ids if in_validation(i, 0.2)}
    assert not any(in_validation(i, 0.0) for i in ids)
    assert all(0.0 <= hash_unit(i, "s") < 1.0 for i in ids[:100])


def test_seeded_subsample_is_seeded_order_free_and_kept_in_order():
    ids = [f"e{i}" for i in range(50)]
    a = seeded_subsample(ids, 10, seed=0)
    assert a == sorted(a) and len(a) == 10 and a == seeded_subsample(ids, 10, seed=0)
    assert a != seeded_subsample(ids, 10, seed=1)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert {ids[i] for i in a} == {shuffled[i] for i in seeded_subsample(shuffled, 10, seed=0)}
    assert seeded_subsample(ids, None, 0) == list(range(50)) == seeded_subsample(ids, 80, 0)
    # Growing n keeps the smaller subsample (nested by hash rank).
    assert set(a) <= set(seeded_subsample(ids, 20, seed=0))
    with pytest.raises(ValueError, match="unique"):
        seeded_subsample(["a", "a"], 1, 0)
