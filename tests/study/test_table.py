"""study/table.py and study/page.py on hand-made seed records: every column equals its definition
(written out here with numpy), the CSV has every column, and the page names every cell's run."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.io import storage
from wmss_ray.io.files import write_jsonl
from wmss_ray.stages.stats import paired_bootstrap_ci
from wmss_ray.study.page import write_study_page
from wmss_ray.study.table import CSV_COLUMNS, pooled_reliability, study_table, summary_text, write_table

N = 40  # problems


def _outcomes(rng, p):
    return [bool(x) for x in rng.random(N) < p]


def _entry(path: str, correct, reliability=None):
    write_jsonl(path, [{"sample_id": f"eval-{i}", "correct": c} for i, c in enumerate(correct)])
    return {"accuracy": float(np.mean(correct)), "loss": 1.0 + 0.1 * float(np.mean(correct)), "n": N,
            "avg_at_k": 0.3, "pass_at_k": 0.5, "brier": 0.2, "ece": 0.1, "reliability": reliability,
            "per_sample_path": str(path), "model_dir": f"{path}.model"}


def _records(root):
    """Three seeds of WMSS and SFT-continued; per-problem files under ``root`` (a path or a URI)."""
    rng = np.random.default_rng(0)
    records, truth = [], {}
    for seed in (0, 1, 2):
        arms = {}
        for arm, label, p in (("wmss", "WMSS", 0.6), ("sft_matched_updates", "SFT-continued", 0.4)):
            final, peak = _outcomes(rng, p), _outcomes(rng, p + 0.1)
            truth[(arm, "final", seed)], truth[(arm, "peak", seed)] = final, peak
            rel = [{"low": 0.5, "high": 0.6, "n": 10 + seed, "confidence": 0.55, "accuracy": 0.4 + 0.1 * seed}]
            arms[arm] = {"label": label, "run_dir": f"/runs/study/seed{seed}", "phase": arm, "config_hash": f"h{seed}",
                         "steps": 10, "final": _entry(storage.join(str(root), f"{arm}{seed}f.jsonl"), final, rel),
                         "peak": _entry(storage.join(str(root), f"{arm}{seed}p.jsonl"), peak), "peak_step": 4 + seed,
                         "peak_validation_accuracy": 0.5,
                         "costs": {"updates": 10, "supervised_tokens": 1000 + seed, "tokens": 5000, "flops": 1e12,
                                   "seconds": 30.0 + seed, "gpu_hours": 0.0, "peak_rss_mb": 900.0, "peak_gpu_mb": None}}
        records.append({"seed": seed, "train_seed": 5 + seed, "run_dir": f"/runs/study/seed{seed}", "arms": arms})
    return records, truth


def test_every_column_equals_its_definition(tmp_path):
    base = load_config("configs/test-tiny.yaml", [f"run.storage={tmp_path}", "study.n_boot=2000", "run.seed=3"])
    records, truth = _records(tmp_path)
    table = study_table(base, records)
    rows = {(r["arm"], r["checkpoint"]): r for r in table["rows"]}
    assert set(rows) == {(a, c) for a in ("wmss", "sft_matched_updates") for c in ("final", "peak")}
    for cp in ("final", "peak"):
        row = rows[("sft_matched_updates", cp)]
        acc = np.array([np.mean(truth[("sft_matched_updates", cp, s)]) for s in range(3)])
        wacc = np.array([np.mean(truth[("wmss", cp, s)]) for s in range(3)])
        assert row["accuracy_mean"] == pytest.approx(acc.mean())
        assert row["accuracy_std"] == pytest.approx(acc.std(ddof=1))
        assert (row["accuracy_min"], row["accuracy_max"]) == (pytest.approx(acc.min()), pytest.approx(acc.max()))
        d = acc - wacc
        half = 4.303 * d.std(ddof=1) / math.sqrt(3)  # t(0.975, 2 df)
        assert row["diff_vs_wmss"] == pytest.approx(d.mean())
        assert (row["diff_seed_ci_low"], row["diff_seed_ci_high"]) == (pytest.approx(d.mean() - half),
                                                                       pytest.approx(d.mean() + half))
        order = sorted(range(N), key=lambda i: f"eval-{i}")  # the table pairs problems by sorted sample_id
        per_problem = np.mean([truth[("sft_matched_updates", cp, s)] for s in range(3)], axis=0)[order]
        w_per_problem = np.mean([truth[("wmss", cp, s)] for s in range(3)], axis=0)[order]
        assert (row["diff_sample_ci_low"], row["diff_sample_ci_high"]) == paired_bootstrap_ci(
            per_problem, w_per_problem, n_boot=2000, seed=3)
        assert row["diff_sample_ci_low"] < d.mean() < row["diff_sample_ci_high"]
        assert row["supervised_tokens"] == pytest.approx(1001) and row["seconds"] == pytest.approx(31.0)
        assert row["peak_gpu_mb"] is None  # on CPU: no GPU figure, never a made-up 0
        assert [c["config_hash"] for c in row["cells"]] == ["h0", "h1", "h2"]
    assert rows[("wmss", "peak")]["peak_steps"] == [4, 5, 6] and rows[("wmss", "final")]["peak_steps"] == [10] * 3
    assert "diff_vs_wmss" not in rows[("wmss", "final")]
    # reliability pooled over seeds: row-weighted
    rel = rows[("wmss", "final")]["reliability"]
    assert rel == [{"low": 0.5, "high": 0.6, "n": 33, "confidence": pytest.approx(0.55),
                    "accuracy": pytest.approx((10 * 0.4 + 11 * 0.5 + 12 * 0.6) / 33)}]
    assert pooled_reliability([None, {"reliability": None}]) == []

    js, path = write_table(str(tmp_path / "study"), table)
    with open(path) as f:
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == CSV_COLUMNS and len(lines) == 4
    assert json.loads(open(js).read())["rows"][0]["label"] == "WMSS"
    page = write_study_page(str(tmp_path / "study"), table)
    text = open(page).read()
    assert "SFT-continued" in text and "/runs/study/seed2" in text and "h2" in text
    assert text.count("data:image/png;base64") == 2  # the forest plot and the reliability diagram
    assert "SFT-continued" in summary_text(table)
