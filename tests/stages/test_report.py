"""The report renders from a fake run dir (small synthetic files) and from one with parts missing."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss_ray.config.loading import config_from_dict, save_config
from wmss_ray.stages import stats
from wmss_ray.stages.evaluate import EvalResult, write_per_sample
from wmss_ray.stages.report import collect_results, format_results_table, write_report

ACC = {"M0": 0.10, "M1": 0.50, "SFT-continued": 0.52, "WMSS": 0.60}


def _write_metrics(path, phase, n=12, mixed=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in range(1, n + 1):
            m = {"step": s, "loss": 2.0 / s, "ce_strong": 2.2 / s if mixed else 2.0 / s,
                 "p_mix": 0.3 + 0.02 * s, "p_strong": 0.25 + 0.03 * s,
                 "nontarget_ratio": float("nan") if not mixed else 0.8, "grad_norm": 1.0, "lr": 1e-3,
                 "tokens_per_s": 1000.0, "phase": phase}
            f.write(json.dumps(m) + "\n")


def _write_eval(eval_dir, n=40):
    rng = np.random.default_rng(1)
    table = {}
    for name, acc in ACC.items():
        correct = rng.random(n) < acc
        per = [{"sample_id": f"eval-{i}", "correct": bool(c), "generated": "#### 1", "predicted": "1",
                "reference": "1" if c else "2", "nll": 1.0, "n_tokens": 4} for i, c in enumerate(correct)]
        res = EvalResult(name=name, model_dir=f"/m/{name}", n=n, accuracy=float(correct.mean()),
                         loss=1.0 - acc, n_loss_tokens=4 * n, per_sample=per)
        write_per_sample(res, eval_dir)
        table[name] = res.summary()
    eval_set = {"name": "test", "source": "/data/eval.jsonl", "n": n, "max_samples": n, "subsample_seed": 3}
    (eval_dir / "eval_results.json").write_text(json.dumps({"checker": "math", "eval_set": eval_set, "models": table}))
    return table


def _write_scores(path, n=300):
    rng = np.random.default_rng(0)
    hw = rng.uniform(0.2, 2.0, n)
    hs = np.clip(hw + rng.normal(-0.2, 0.3, n), 0.01, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sample_id": [f"train-{i}" for i in range(n)], "h_weak": hw, "h_strong": hs,
                             "dh": hs - hw, "n_answer_tokens": rng.integers(5, 30, n)}), path)


def _write_weights(path, n=300, seed=0):
    """A curriculum phase's weights.parquet: weights and the draw counts of n draws from them."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(n))
    draws = np.bincount(rng.choice(n, n, p=w), minlength=n)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sample_id": [f"train-{i}" for i in range(n)], "weight": w, "draws": draws}), path)
    return w, draws


@pytest.fixture()
def fake_run(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    save_config(config_from_dict({"run": {"name": "demo", "storage": str(tmp_path / "runs")},
                                  "evaluation": {"paired_bootstrap": 500}}), run / "config.yaml")
    _write_metrics(run / "sft_continued" / "metrics.jsonl", "sft_continued", mixed=False)
    _write_metrics(run / "wmss_1" / "metrics.jsonl", "wmss")
    _write_scores(run / "score_1" / "scores.parquet")
    _write_weights(run / "curriculum_1" / "weights.parquet")
    _write_eval(run / "eval")
    return run


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _assert_self_contained(page: str):
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    # Every src= is an embedded data URI.
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))


def test_full_report(fake_run):
    path = write_report(fake_run)
    assert path == fake_run / "report" / "report.html"
    page = path.read_text()
    _assert_self_contained(page)
    assert "<table" in page
    for name, acc in ACC.items():
        assert f"<td>{name}</td>" in page
    imgs = _images(page)
    assert len(imgs) == 4 and all(b.startswith(b"\x89PNG") for b in imgs)
    for png in ("training_curves.png", "target_probs.png", "entropy_scatter.png", "weights_hist.png"):
        assert (path.parent / png).read_bytes().startswith(b"\x89PNG")
    assert "WMSS vs SFT-continued" in page and "WMSS vs M1" in page
    assert "class=\"missing\"" not in page
    # Which set the numbers come from, how it was subsampled, which checker judged them.
    assert "Numbers on the test set (data.eval" in page and "/data/eval.jsonl, 40 problems" in page
    assert "seeded subsample of at most 40, seed 3" in page and "answer checker <b>math</b>" in page
    cfg_hash = config_from_dict(collect_results(fake_run)["config"]).config_hash()
    assert cfg_hash in page and "paired_bootstrap: 500" in page

    # The paired test in the report is the one stats computes from the per-sample files.
    data = json.loads((path.parent / "report_data.json").read_text())
    assert data["checker"] == "math" and data["eval_set"]["name"] == "test"
    p = data["paired"][0]
    a = [json.loads(line) for line in (fake_run / "eval" / "eval_WMSS.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (fake_run / "eval" / "eval_SFT-continued.jsonl").read_text().splitlines()]
    direct = stats.paired_test_per_sample(a, b, "WMSS", "SFT-continued", n_boot=500, seed=0)
    assert p["p_value"] == pytest.approx(direct.p_value) and p["ci_low"] == pytest.approx(direct.ci_low)


def test_weight_histogram_is_the_curriculum_phases_weights(fake_run):
    """The histogram and its summary come from curriculum_<t>/weights.parquet (what was drawn
    from), the last iteration's when there are several; a new draw changes them."""
    w, draws = _write_weights(fake_run / "curriculum_2" / "weights.parquet", seed=5)
    path = write_report(fake_run)
    data = json.loads((path.parent / "report_data.json").read_text())
    hist = data["weight_histogram"]
    assert data["weights"] == str(fake_run / "curriculum_2" / "weights.parquet")
    counts, edges = np.histogram(w, bins=len(hist["counts"]))
    assert hist["counts"] == counts.tolist() and hist["bin_edges"] == pytest.approx(edges.tolist())
    assert hist["effective_sample_size"] == pytest.approx(w.sum() ** 2 / (w ** 2).sum())
    assert hist["max_draws_per_sample"] == draws.max() and hist["draws"] == draws.sum() == 300
    assert hist["samples_drawn"] == (draws > 0).sum()
    assert f"{hist['effective_sample_size']:.1f} of 300" in path.read_text()


def test_report_from_pipeline_results_dict(fake_run, tmp_path):
    """The shape pipeline._phase_report passes: explicit paths, models table, config + hash."""
    models = json.loads((fake_run / "eval" / "eval_results.json").read_text())["models"]
    results = {
        "models": {n: {k: m[k] for k in ("accuracy", "loss", "n", "model_dir")} for n, m in models.items()},
        "phases": {"sft_continued": str(fake_run / "sft_continued" / "metrics.jsonl"), "wmss": None},
        "scores": str(fake_run / "score_1" / "scores.parquet"),
        "weights": str(fake_run / "curriculum_1" / "weights.parquet"),
        "eval_dir": str(fake_run / "eval"),
        "config": {"run": {"name": "given"}},
        "config_hash": "abc123hash",
    }
    out = tmp_path / "elsewhere" / "r.html"
    path = write_report(fake_run, results, out)
    page = path.read_text()
    _assert_self_contained(page)
    assert path == out and "abc123hash" in page and "WMSS run report: given" in page
    assert len(_images(page)) == 4  # wmss=None falls back to the run dir's wmss_1


def test_report_from_empty_run_dir(tmp_path):
    path = write_report(tmp_path / "nothing_here")
    page = path.read_text()
    _assert_self_contained(page)
    assert _images(page) == []
    for msg in ("No evaluation results", "No paired comparison", "No training metrics", "No WMSS metrics",
                "No scores.parquet", "No curriculum weights", "No config found"):
        assert msg in page


def test_report_with_some_parts_missing(tmp_path):
    run = tmp_path / "partial"
    _write_eval(run / "eval")
    _write_scores(run / "score_2" / "scores.parquet")
    _write_metrics(run / "wmss_1" / "metrics.jsonl", "wmss")  # no sft_continued, no config, no curriculum
    page = write_report(run).read_text()
    _assert_self_contained(page)
    assert len(_images(page)) == 3  # curves (WMSS only), probs, scatter
    assert "No curriculum weights" in page
    assert "No config found" in page and "config hash unknown" in page
    assert "<td>WMSS</td>" in page


def test_format_results_table():
    results = {"models": {"WMSS": {"accuracy": 0.6, "loss": 0.81234, "n": 500},
                          "M0": {"accuracy": 0.1, "loss": float("nan"), "n": 500},
                          "SFT-continued": {"accuracy": 0.55, "loss": 0.9, "n": 500}}}
    text = format_results_table(results)
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == ["M0", "SFT-continued", "WMSS"]
    assert len({len(ln) for ln in lines[2:]}) == 1  # fixed width
    assert "0.8123" in text and "-" in lines[2]
    # Directly a {name: EvalResult} mapping, plus a paired line.
    res = {"WMSS": EvalResult("WMSS", "/m", 2, 0.5, 1.0)}
    t = stats.paired_test([1, 0, 1], [0, 0, 1], "WMSS", "SFT-continued", n_boot=100).to_dict()
    assert "WMSS" in format_results_table(res)
    assert "WMSS vs SFT-continued: +0.3333" in format_results_table({"models": res, "paired": t})
    assert format_results_table({}) == "(no evaluation results)"
    assert not math.isnan(t["p_value"])


def test_report_shows_the_weak_pool_truncation_when_present(fake_run):
    assert "Weak pool" not in write_report(fake_run).read_text()  # colocated run: no section
    path = fake_run / "wmss_1" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, m in enumerate(rows):
        m.update(trunc_bound=0.01 * (i + 1), weak_tail_mass_mean=0.1, weak_tail_mass_max=0.4,
                 pool_reply_bytes_per_token=520.0, trunc_warning=i == 0, n_sampled=16,
                 trunc_error_sampled_mean=0.001, trunc_bound_sampled_mean=0.02)
    path.write_text("".join(json.dumps(m) + "\n" for m in rows))
    page = write_report(fake_run).read_text()
    assert "Weak pool: top-k truncation" in page and f"{0.01 * len(rows):.3g}" in page and "520" in page
    assert "<td>steps over mix.pool.error_warn</td><td>1</td>" in page
