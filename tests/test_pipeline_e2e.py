"""End to end: the shrunken demo (configs/test-tiny.yaml) through every phase on a real local Ray.

Checks each phase's outputs and manifest, that a re-run skips everything, that ``--from`` reruns
exactly the later phases, and that the exported WMSS model loads in plain transformers and generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wmss_ray.config import load_config
from wmss_ray.pipeline import build_phases, run_pipeline

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "configs" / "test-tiny.yaml", [f"run.storage={storage}"])
    outputs = run_pipeline(cfg)
    return cfg, outputs


def _manifest(cfg, phase):
    return json.loads((Path(cfg.run_dir()) / phase / "manifest.json").read_text())


def test_every_phase_completed_with_outputs(tiny_run):
    cfg, outputs = tiny_run
    names = [p.name for p in build_phases(cfg)]
    assert list(outputs) == names
    for name in names:
        man = _manifest(cfg, name)
        assert man["status"] == "completed", name
        assert man["config_hash"] == cfg.config_hash()
        assert man["outputs"] == outputs[name]


def test_phase_outputs_are_consistent(tiny_run):
    import pyarrow.parquet as pq

    cfg, out = tiny_run
    counts = _manifest(cfg, "tokenize")["counts"]
    assert counts["rows_in"] == cfg.data.demo.n_train == counts["rows_ok"] + counts["rows_rejected"]
    scores = pq.read_table(out["score_1"]["scores"]).to_pandas()
    assert len(scores) == counts["rows_ok"] and scores["sample_id"].is_unique
    assert abs(scores["weight"].sum() - 1.0) < 1e-9
    sampled = pq.read_table(out["curriculum_1"]["sampled_ids"]).to_pandas()
    assert len(sampled) == round(len(scores) * cfg.curriculum.sample_multiplier)
    assert set(sampled["sample_id"]) <= set(scores["sample_id"])
    # equal compute: the baseline ran exactly as many optimizer steps as WMSS
    assert out["baseline"]["steps"] == out["wmss_1"]["steps"] > 0
    for phase in ("sft", "wmss_1", "baseline"):
        lines = Path(out[phase]["metrics"]).read_text().splitlines()
        assert lines and all(json.loads(line)["loss"] == json.loads(line)["loss"] for line in lines)  # no NaN
    models = out["eval"]["models"]
    assert set(models) == {"M0", "M1", "SFT-continued", "WMSS"}
    for m in models.values():
        assert m["n"] == cfg.data.demo.n_eval and 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0
    assert out["eval"]["checker"] == "demo" and out["eval"]["eval_set"]["name"] == "test"
    html = Path(out["report"]["report"]).read_text()
    assert "WMSS" in html and "SFT-continued" in html and "data:image/png;base64" in html
    assert "answer checker <b>demo</b>" in html and "test set" in html


def test_rerun_skips_and_from_reruns_later_phases(tiny_run, capsys):
    cfg, out = tiny_run
    before = {p: _manifest(cfg, p)["finished_at"] for p in out}
    run_pipeline(cfg)
    assert {p: _manifest(cfg, p)["finished_at"] for p in out} == before  # nothing ran again
    run_pipeline(cfg, from_phase="eval")
    after = {p: _manifest(cfg, p)["finished_at"] for p in out}
    assert [p for p in out if after[p] != before[p]] == ["eval", "report"]


def test_exported_wmss_model_generates_in_plain_transformers(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = tiny_run
    model_dir = out["wmss_1"]["model_dir"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Compute 2 + 3."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_tune_sweep_reuses_the_shared_phases(tiny_run):
    """One Ray Tune trial on top of the finished run: only curriculum -> WMSS -> eval run in it."""
    from tune.sweep import SHARED_PHASES, run_sweep

    cfg, out = tiny_run
    sweep_cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={
        "num_samples": 1, "search_space": {"mix.lam": {"choice": [0.3]}}})})
    grid = run_sweep(sweep_cfg)
    assert len(grid) == 1 and grid.errors == []
    result = grid[0]
    assert result.config == {"mix.lam": 0.3}
    # the trial is judged on the validation split, never on data.eval (the test set)
    assert 0.0 <= result.metrics["validation_accuracy"] <= 1.0
    assert result.metrics["n_validation"] == cfg.data.demo.n_validation
    trial_dirs = [d for d in (Path(cfg.run_dir()) / "tune").iterdir() if d.name != "sweep"]
    assert len(trial_dirs) == 1
    for phase in SHARED_PHASES:
        assert (trial_dirs[0] / phase).is_symlink()
    trial_wmss = json.loads((trial_dirs[0] / "wmss_1" / "manifest.json").read_text())
    assert trial_wmss["status"] == "completed"
    assert trial_wmss["fingerprint"] != _manifest(cfg, "wmss_1")["fingerprint"]  # λ differs
