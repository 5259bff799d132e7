"""The curriculum phase (scoring/curriculum.py): seeded draws, modes, and the weights it writes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wmss_ray.stages.curriculum import curriculum_weights, sample_curriculum, sampling_weights

from .conftest import tiny_cfg


def _scores_file(path, n: int = 50) -> str:
    rng = np.random.default_rng(0)
    hw, hs = rng.uniform(0.5, 3, n), rng.uniform(0.5, 3, n)
    ids = [f"s{i:03d}" for i in range(n)]
    pq.write_table(pa.table({"sample_id": ids, "h_weak": hw, "h_strong": hs, "dh": hs - hw,
                             "n_answer_tokens": np.full(n, 10)}), path)
    return str(path)


def _ids(res) -> list[str]:
    return pq.read_table(res.sampled_ids_path)["sample_id"].to_pylist()


def test_sample_curriculum_seeded_counts_and_modes(tmp_path):
    scores = _scores_file(tmp_path / "scores.parquet")
    cfg = tiny_cfg("curriculum.sample_multiplier=1.5")
    a, b = (sample_curriculum(cfg, scores, str(tmp_path / d), seed=3) for d in ("a", "b"))
    c = sample_curriculum(cfg, scores, str(tmp_path / "c"), seed=4)
    assert len(_ids(a)) == 75 and _ids(a) == _ids(b) and _ids(a) != _ids(c)  # round(50 * 1.5) draws
    assert a.sampled_ids_path == str(tmp_path / "a" / "sampled_ids.parquet")
    assert len(set(_ids(a))) < len(_ids(a))  # with replacement
    dedup = _ids(sample_curriculum(tiny_cfg("curriculum.dedup=true"), scores, str(tmp_path / "d"), 3))
    assert len(dedup) == len(set(dedup))
    # Disabled curriculum: uniform draw, independent of the entropies.
    off = tiny_cfg("curriculum.enabled=false", "curriculum.sample_multiplier=200")
    drawn = _ids(sample_curriculum(off, scores, str(tmp_path / "u"), 0))
    counts = np.unique(drawn, return_counts=True)[1]
    assert len(drawn) == 10000 and len(counts) == 50 and counts.min() > 120  # ~200 each


def test_weights_written_are_the_ones_drawn_from(tmp_path):
    scores = _scores_file(tmp_path / "scores.parquet")
    t = pq.read_table(scores)
    for beta in (0.8, 0.0):
        cfg = tiny_cfg(f"curriculum.beta={beta}", "curriculum.sample_multiplier=3")
        res = sample_curriculum(cfg, scores, str(tmp_path / f"b{beta}"), seed=1)
        w = pq.read_table(res.weights_path)
        assert w.column_names == ["sample_id", "weight", "draws"]
        assert w["sample_id"].to_pylist() == t["sample_id"].to_pylist()
        c = cfg.curriculum
        expected = sampling_weights(t["h_weak"].to_numpy(), t["h_strong"].to_numpy(), c.alpha, c.beta, c.gamma)
        np.testing.assert_array_equal(w["weight"].to_numpy(), expected)
        np.testing.assert_array_equal(w["weight"].to_numpy(), curriculum_weights(cfg, t["h_weak"].to_numpy(),
                                                                                 t["h_strong"].to_numpy()))
        # the draw counts are the sampled ids, counted
        drawn = np.unique(_ids(res), return_counts=True)
        per_id = dict(zip(w["sample_id"].to_pylist(), w["draws"].to_pylist()))
        assert {k: v for k, v in per_id.items() if v} == dict(zip(drawn[0].tolist(), drawn[1].tolist()))
        assert res.counts["draws"] == 150 and res.counts["rows_scored"] == 50
        assert res.counts["max_draws_per_sample"] == max(per_id.values())
        assert res.counts["samples_drawn"] == len(drawn[0])
        ew = w["weight"].to_numpy()
        assert abs(res.counts["effective_sample_size"] - ew.sum() ** 2 / (ew ** 2).sum()) < 1e-9
