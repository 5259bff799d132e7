"""The pipeline runner's bookkeeping (phase order, skip, --from, fingerprints, links), with
stand-in phase bodies (tests/pipeline_fakes.py). Its resume rules: tests/test_pipeline_resume.py.

The end-to-end run of the real phases lives in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.pipeline_fakes import fake_phases
from wmss_ray import pipeline
from wmss_ray.config.loading import load_config
from wmss_ray.pipeline import build_phases, run_pipeline


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.storage={tmp_path}", "run.name=r"])


def test_phase_order_for_the_demo_and_for_k_iterations(cfg):
    assert [p.name for p in build_phases(cfg)] == [
        "data", "phase0", "tokenize", "sft", "score_1", "curriculum_1", "wmss_1", "sft_continued", "eval", "report"]
    k2 = load_config(None, ["run.iterations=2"])
    names = [p.name for p in build_phases(k2)]
    assert names[4:10] == ["score_1", "curriculum_1", "wmss_1", "score_2", "curriculum_2", "wmss_2"]
    # iteration 2: weak = M1 (sft), strong = M2 (wmss_1)
    score2 = next(p for p in build_phases(k2) if p.name == "score_2")
    assert set(score2.needs) == {"tokenize", "wmss_1", "sft"}


def test_real_models_skip_the_demo_phases():
    c = load_config(None, ["models.demo=false", "models.base=/m0", "data.train=/d.jsonl"])
    names = [p.name for p in build_phases(c)]
    assert names[0] == "tokenize" and "phase0" not in names and "data" not in names


def test_rerun_skips_completed_phases_and_from_reruns(cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    run_pipeline(cfg)
    first = list(calls)
    assert first[0] == "data" and first[-1] == "report"
    run_dir = cfg.run_dir()
    man = json.loads(open(f"{run_dir}/wmss_1/manifest.json").read())
    assert man["status"] == "completed" and man["counts"] == {"rows": 1} and man["seconds"] is not None
    assert man["config_hash"] == cfg.config_hash()

    calls.clear()
    run_pipeline(cfg)
    assert calls == []  # everything completed with the same inputs

    calls.clear()
    run_pipeline(cfg, from_phase="wmss_1")
    assert calls == ["wmss_1", "sft_continued", "eval", "report"]


@pytest.mark.parametrize("override, reruns", [
    ("mix.lam=0.3", ["wmss_1", "sft_continued", "eval", "report"]),
    # the weak override: pre-training, tokenising and SFT keep their fingerprints
    ("models.weak=/models/half-sft", ["score_1", "curriculum_1", "wmss_1", "sft_continued", "eval", "report"]),
    # how many checkpoints Ray Train keeps: how a run is executed, not what it computes
    ("training.checkpoints_to_keep=5", []),
    ("training.max_preemption_failures=3", []),
])
def test_a_changed_key_reruns_only_the_phases_it_feeds(override, reruns, cfg, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    run_pipeline(cfg)
    calls.clear()
    weak = tmp_path / "half-sft"  # run_pipeline checks that a model directory it names is one
    weak.mkdir()
    (weak / "config.json").write_text("{}")
    override = override.replace("/models/half-sft", str(weak))
    run_pipeline(load_config(None, [f"run.storage={tmp_path}", "run.name=r", override]))
    assert calls == reruns


def test_completed_elsewhere_names_the_phases_another_run_made_with_these_fingerprints(cfg, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    run_pipeline(cfg, until="curriculum_1")
    trunk = ("sft", "score_1", "curriculum_1")
    same = load_config(None, [f"run.storage={tmp_path}/study", "run.name=seed0", "mix.mode=frozen"])
    assert pipeline.completed_elsewhere(same, cfg.run_dir(), trunk) == list(trunk)  # mix feeds only wmss
    # another training seed: SFT differs, so does everything after it, matching or not
    seed1 = load_config(None, [f"run.storage={tmp_path}/study", "run.name=seed1", "run.train_seed=1"])
    assert pipeline.completed_elsewhere(seed1, cfg.run_dir(), trunk) == []
    drew = load_config(None, [f"run.storage={tmp_path}/study", "run.name=x", "curriculum.alpha=0.9"])
    assert pipeline.completed_elsewhere(drew, cfg.run_dir(), trunk) == ["sft", "score_1"]
    # a phase that did not complete there is not named, nor any after it
    man = json.loads(open(f"{cfg.run_dir()}/score_1/manifest.json").read())
    open(f"{cfg.run_dir()}/score_1/manifest.json", "w").write(json.dumps({**man, "status": "failed"}))
    assert pipeline.completed_elsewhere(same, cfg.run_dir(), trunk) == ["sft"]


def test_unknown_phase_names_are_refused(cfg):
    with pytest.raises(ValueError, match="unknown phase 'wmss'.*score_1"):
        run_pipeline(cfg, from_phase="wmss")


def test_the_weak_override_is_the_weak_agent_of_iteration_1_only(tmp_path):
    c = load_config(None, ["run.iterations=2", "models.weak=/w"])
    ctx = pipeline.RunContext(c)
    ctx.outputs = {"phase0": {"model_dir": "/m0"}, "sft": {"model_dir": "/m1"}, "wmss_1": {"model_dir": "/m2"}}
    assert ctx.weak_model(1) == "/w" and ctx.weak_model(2) == "/m1"
    assert ctx.tokenizer_source() == "/m0"


def test_a_strong_model_without_base_needs_a_weak_one():
    with pytest.raises(Exception, match="models.weak must name the weak model"):
        load_config(None, ["models.demo=false", "models.strong=/m1", "data.train=/d.jsonl"])
    c = load_config(None, ["models.demo=false", "models.strong=/m1", "models.weak=/m0", "data.train=/d.jsonl"])
    ctx = pipeline.RunContext(c)
    ctx.outputs = {"sft": {"model_dir": "/m1"}}
    assert ctx.tokenizer_source() == "/m1" and ctx.weak_model(1) == "/m0"


def test_a_linked_phase_is_never_rerun_in_place(cfg, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    run_pipeline(cfg)  # the base run
    trial = load_config(None, [f"run.storage={tmp_path}/trials", "run.name=t", "scoring.batch_size=7"])
    os.makedirs(trial.run_dir())
    for phase in ("data", "phase0", "tokenize", "sft", "score_1"):
        os.symlink(f"{cfg.run_dir()}/{phase}", f"{trial.run_dir()}/{phase}")
    before = open(f"{cfg.run_dir()}/score_1/manifest.json").read()
    calls.clear()
    with pytest.raises(RuntimeError, match="phase score_1 is linked from .* has other inputs here"):
        run_pipeline(trial)  # scoring changed, so score_1 would rerun inside the base run
    assert calls == [] and open(f"{cfg.run_dir()}/score_1/manifest.json").read() == before


def test_keys_added_since_a_run_was_made_keep_its_fingerprints_at_their_defaults():
    """A run made before training.lora and the evaluation engine keys existed (its config has none
    of them) has the same phase fingerprints as the same config today at their defaults, so it
    resumes after an upgrade; set to anything else, they change what they feed."""
    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.config.schema import ADDED_KEYS

    cfg = load_config("configs/test-tiny.yaml")
    old = cfg.to_dict()  # what a run from before wrote: the same dict without the added keys
    for dotted in ADDED_KEYS:
        *parents, key = dotted.split(".")
        node = old
        for part in parents:
            node = node[part]
        del node[key]

    def prints(cfg_dict):
        return {p.name: p.fingerprint(cfg_dict, {})
                for p in build_phases(cfg)}

    assert prints(cfg.fingerprint_dict()) == prints(old)
    lora = config_from_dict(cfg.to_dict(), ["training.lora.r=8"])
    changed = {n for n, fp in prints(lora.fingerprint_dict()).items() if fp != prints(old)[n]}
    assert {"sft", "wmss_1"} <= changed and "tokenize" not in changed
    sampled = config_from_dict(cfg.to_dict(), ["evaluation.samples=4"])
    changed = {n for n, fp in prints(sampled.fingerprint_dict()).items() if fp != prints(old)[n]}
    assert "eval" in changed and not {"sft", "wmss_1", "score_1"} & changed


def test_memory_and_file_size_knobs_change_no_fingerprint():
    """``data.rows_per_file``, ``scoring.logits_mb`` and ``evaluation.logits_mb`` say how rows are
    laid out in files and how many rows a forward takes, not what a phase computes: changing them
    reruns nothing."""
    from wmss_ray.config.loading import config_from_dict

    cfg = load_config("configs/test-tiny.yaml")

    def prints(c):
        return {p.name: p.fingerprint(c.fingerprint_dict(), {})
                for p in build_phases(c)}

    knobs = config_from_dict(cfg.to_dict(), ["data.rows_per_file=100", "scoring.logits_mb=1",
                                             "evaluation.logits_mb=1"])
    assert prints(knobs) == prints(cfg)
    assert prints(config_from_dict(cfg.to_dict(), ["scoring.batch_size=3"]))["score_1"] != prints(cfg)["score_1"]


@pytest.mark.parametrize("overrides, reruns", [
    # the same global batch of 16 rows split otherwise, at another ZeRO stage: how it is executed
    (["scaling.num_workers=2", "training.micro_batch_size=8"], []),
    (["scaling.num_workers=4", "training.micro_batch_size=2", "training.grad_accum=2", "training.zero_stage=3"], []),
    (["scaling.num_workers=[1,2]", "training.micro_batch_size=4", "training.global_batch_size=16"], []),
    # what it computes: another global batch (32 rows), another learning rate
    (["scaling.num_workers=2"], ["sft", "score_1", "curriculum_1", "wmss_1", "sft_continued", "eval", "report"]),
    (["training.lr=5e-4"], ["sft", "score_1", "curriculum_1", "wmss_1", "sft_continued", "eval", "report"]),
])
def test_a_training_phase_keeps_its_fingerprint_at_another_layout_of_the_same_global_batch(
        overrides, reruns, cfg, monkeypatch, tmp_path):
    """The demo config trains 16 rows a step on 1 worker; a completed run re-run at another world
    size, batch split or ZeRO stage of those 16 rows skips everything (each phase keeps the
    fingerprint it was made with), another global batch or lr retrains from SFT on."""
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    run_pipeline(cfg)
    before = {p: json.loads(open(f"{cfg.run_dir()}/{p}/manifest.json").read()) for p in ("sft", "wmss_1", "eval")}
    assert before["sft"]["layout"]["training.micro_batch_size"] == 16 and before["eval"]["layout"] is None
    calls.clear()
    resized = load_config(None, [f"run.storage={tmp_path}", "run.name=r", *overrides])
    run_pipeline(resized)
    assert calls == reruns
    if not reruns:
        after = {p: json.loads(open(f"{cfg.run_dir()}/{p}/manifest.json").read()) for p in before}
        assert {p: m["fingerprint"] for p, m in after.items()} == {p: m["fingerprint"] for p, m in before.items()}
