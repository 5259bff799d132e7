"""The pipeline runner's bookkeeping (skip, --from, crash resume), with stand-in phase bodies.

The end-to-end run of the real phases lives in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from wmss_ray import pipeline
from wmss_ray.config.loading import load_config
from wmss_ray.pipeline import Phase, build_phases, run_pipeline


def _fake_phases(calls, fail_at=None):
    def make(name):
        def run(ctx):
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"boom in {name}")
            return {"outputs": {"model_dir": f"/fake/{name}", "steps": 3}, "counts": {"rows": 1}}
        return run

    def phases(cfg):
        real = build_phases(cfg)
        return [dataclasses.replace(p, run=make(p.name)) for p in real]

    return phases


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
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
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
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
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
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
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


def test_a_crash_is_recorded_and_the_next_run_resumes_there(cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls, fail_at="score_1"))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg)
    man = json.loads(open(f"{cfg.run_dir()}/score_1/manifest.json").read())
    assert man["status"] == "failed" and "boom in score_1" in man["error"]

    calls.clear()
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
    run_pipeline(cfg)
    assert calls[0] == "score_1" and "sft" not in calls


def test_a_resumed_phase_counts_the_wall_time_of_the_runs_it_resumed(cfg, monkeypatch):
    """``earlier_seconds``: a failed run to its end; a run whose driver was killed (its manifest still
    ``running``) to the last file written in the phase directory; summed over every resume, and
    counted in ``total_seconds`` (the study's cost columns, the timing table)."""
    import time

    from wmss_ray.io.manifest import read_manifest
    from wmss_ray.training.costs import phase_costs

    calls = []
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls, fail_at="score_1"))
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg)
    phase_dir = f"{cfg.run_dir()}/score_1"
    failed = read_manifest(phase_dir)
    # the next run is killed: its manifest says running; its last write was 40 s after its start
    killed = dataclasses.replace(failed, status="running", started_at=time.time() - 100, finished_at=None,
                                 seconds=None, earlier_seconds=round(failed.finished_at - failed.started_at, 2))
    killed.write(phase_dir)
    with open(f"{phase_dir}/part-0.parquet", "w") as f:
        f.write("rows")
    os.utime(f"{phase_dir}/part-0.parquet", (killed.started_at + 40, killed.started_at + 40))
    os.utime(f"{phase_dir}/manifest.json", (killed.started_at, killed.started_at))
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
    run_pipeline(cfg)
    man = read_manifest(phase_dir)
    assert man.status == "completed" and os.path.exists(f"{phase_dir}/part-0.parquet")  # resumed, not cleared
    assert man.earlier_seconds == pytest.approx(killed.earlier_seconds + 40, abs=0.02)
    assert man.total_seconds == pytest.approx(man.seconds + man.earlier_seconds, abs=0.01)
    assert phase_costs(phase_dir)["seconds"] == man.total_seconds
    # a phase run anew (another fingerprint) starts from nothing: no earlier time
    assert read_manifest(f"{cfg.run_dir()}/sft").earlier_seconds == 0.0
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
    run_pipeline(load_config(None, [f"run.storage={cfg.run.storage}", "run.name=r", "scoring.batch_size=3"]))
    assert read_manifest(phase_dir).earlier_seconds == 0.0


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
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
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


# Every phase of the demo pipeline: the input to change that feeds it (the phase's own section).
_FEEDS = {"data": "data.demo.n_train=40", "phase0": "phase0.steps=3", "tokenize": "data.max_seq_len=90",
          "sft": "training.lr=0.002", "score_1": "scoring.batch_size=7", "curriculum_1": "curriculum.beta=0.5",
          "wmss_1": "mix.lam=0.9", "sft_continued": "training.lr=0.002", "eval": "evaluation.max_new_tokens=9"}


@pytest.mark.parametrize("phase", list(_FEEDS))
def test_a_phase_keeps_its_work_only_for_an_interrupted_run_of_the_same_inputs(phase, cfg, monkeypatch, tmp_path):
    """The stale-resume rule, for every phase that keeps partial work: what a run left in the
    phase directory (checkpoints, parts, metrics) is resumed only by a rerun of the same inputs
    after a crash; a change of an input that feeds the phase, or ``--from``, starts it empty."""
    calls = []
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    leftover = os.path.join(cfg.run_dir(), phase, "ray_train", "checkpoint_000002")

    def crash_leaving_work(cfg_, fail=True):
        phases = _fake_phases(calls, fail_at=phase if fail else None)

        def with_leftover(c):
            out = []
            for p in phases(c):
                def run(ctx, _run=p.run, _name=p.name):
                    if _name == phase and fail:
                        os.makedirs(leftover, exist_ok=True)
                    return _run(ctx)
                out.append(dataclasses.replace(p, run=run))
            return out
        monkeypatch.setattr(pipeline, "build_phases", with_leftover)

    crash_leaving_work(cfg)
    with pytest.raises(RuntimeError, match=f"boom in {phase}"):
        run_pipeline(cfg)
    crash_leaving_work(cfg, fail=False)
    run_pipeline(cfg, until=phase)  # same inputs: the interrupted run's work is resumed
    assert os.path.isdir(leftover), "an interrupted run of the same inputs must keep its checkpoints"

    changed = load_config(None, [f"run.storage={tmp_path}", "run.name=r", _FEEDS[phase]])
    run_pipeline(changed, until=phase)
    assert not os.path.exists(os.path.dirname(leftover)), "another run's work must be cleared"
    man = json.loads(open(os.path.join(cfg.run_dir(), phase, "manifest.json")).read())
    assert man["status"] == "completed"

    os.makedirs(leftover)
    run_pipeline(changed, from_phase=phase, until=phase)  # forced: starts empty too
    assert not os.path.exists(os.path.dirname(leftover))


def test_a_stopped_phase_ends_the_run_and_resumes(cfg, monkeypatch):
    """A phase that stops short of its end on purpose (a tune trial's chunk) is ``stopped``: the
    run ends there, and the next run of the same inputs resumes it (its work kept)."""
    calls = []
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    phases = _fake_phases(calls)

    def stopping(c):
        def stop(ctx):
            calls.append("wmss_1")
            os.makedirs(os.path.join(ctx.run_dir, "wmss_1", "ray_train"), exist_ok=True)
            return {"outputs": {"model_dir": None, "steps": 1}, "status": "stopped"}
        return [dataclasses.replace(p, run=stop) if p.name == "wmss_1" else p for p in phases(c)]

    monkeypatch.setattr(pipeline, "build_phases", stopping)
    out = run_pipeline(cfg)
    assert calls[-1] == "wmss_1" and "sft_continued" not in out
    man = json.loads(open(f"{cfg.run_dir()}/wmss_1/manifest.json").read())
    assert man["status"] == "stopped"
    calls.clear()
    monkeypatch.setattr(pipeline, "build_phases", phases)
    run_pipeline(cfg)
    assert calls == ["wmss_1", "sft_continued", "eval", "report"]
    assert os.path.isdir(f"{cfg.run_dir()}/wmss_1/ray_train")  # resumed, not cleared


def test_run_phases_runs_any_phase_list_with_the_same_skip_resume_and_clear_rules(cfg, monkeypatch, tmp_path):
    """The sweep's control is a Phase run by the same runner in another run dir, reading phases run
    elsewhere: skipped when done with the same inputs, rerun from an empty dir when its extra inputs
    (the step count) change, resumed when interrupted."""
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    calls = []

    def control(steps, fail=False):
        def run(ctx):
            calls.append(steps)
            os.makedirs(os.path.join(ctx.phase_dir("sft_continued"), "ray_train"), exist_ok=True)
            if fail:
                raise RuntimeError("boom")
            return {"outputs": {"model_dir": ctx.out("sft", "model_dir") + f"+{steps}"}}
        return Phase("sft_continued", ["sft"], ["training"], run, extra={"steps": steps})

    def run(steps, fail=False):
        ctx = pipeline.RunContext(cfg, run_dir=str(tmp_path / "tune"))
        ctx.outputs, ctx.fingerprints = {"sft": {"model_dir": "/m1"}}, {"sft": "abc"}
        return pipeline.run_phases(ctx, [control(steps, fail)])

    with pytest.raises(RuntimeError, match="boom"):
        run(2, fail=True)
    assert run(2)["sft_continued"]["model_dir"] == "/m1+2" and calls == [2, 2]
    assert os.path.isdir(tmp_path / "tune" / "sft_continued" / "ray_train")  # resumed, not cleared
    run(2)
    assert calls == [2, 2]  # completed with the same inputs: skipped
    (tmp_path / "tune" / "sft_continued" / "ray_train" / "x").mkdir()
    run(3)
    assert calls == [2, 2, 3] and not (tmp_path / "tune" / "sft_continued" / "ray_train" / "x").exists()
    man = json.loads((tmp_path / "tune" / "sft_continued" / "manifest.json").read_text())
    assert man["status"] == "completed" and man["inputs"] == {"sft": {"model_dir": "/m1"}}


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
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
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


def test_an_interrupted_training_phase_resumes_its_work_at_another_layout(cfg, monkeypatch, tmp_path):
    """wmss_1 crashes at 1 worker; rerun at 2 workers x micro-batch 8 (the same 16 rows), it runs
    again in its directory as it was (its checkpoints kept, not cleared), under its fingerprint,
    and its manifest keeps the layout that fingerprint was computed with."""
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls, fail_at="wmss_1"))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg)
    wmss = f"{cfg.run_dir()}/wmss_1"
    fp = json.loads(open(f"{wmss}/manifest.json").read())["fingerprint"]
    open(f"{wmss}/checkpoint_marker", "w").close()  # stands in for its Ray Train checkpoints
    calls.clear()
    monkeypatch.setattr(pipeline, "build_phases", _fake_phases(calls))
    run_pipeline(load_config(None, [f"run.storage={tmp_path}", "run.name=r", "scaling.num_workers=2",
                                    "training.micro_batch_size=8"]))
    assert calls == ["wmss_1", "sft_continued", "eval", "report"]
    man = json.loads(open(f"{wmss}/manifest.json").read())
    assert os.path.exists(f"{wmss}/checkpoint_marker")
    assert man["status"] == "completed" and man["fingerprint"] == fp
    assert man["layout"]["scaling.num_workers"] == 1 and man["layout"]["training.micro_batch_size"] == 16
