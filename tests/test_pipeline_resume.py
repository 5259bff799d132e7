"""The pipeline runner's resume rules, with stand-in phase bodies: a crashed or stopped phase of
the same inputs resumes its work (and counts the time of the runs it resumed), any other input or
``--from`` starts it empty. The skip and fingerprint rules are in tests/test_pipeline_runner.py."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from tests.pipeline_fakes import fake_phases
from wmss_ray import pipeline
from wmss_ray.config.loading import load_config
from wmss_ray.pipeline import Phase, run_pipeline


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.storage={tmp_path}", "run.name=r"])


def test_a_crash_is_recorded_and_the_next_run_resumes_there(cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls, fail_at="score_1"))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg)
    man = json.loads(open(f"{cfg.run_dir()}/score_1/manifest.json").read())
    assert man["status"] == "failed" and "boom in score_1" in man["error"]

    calls.clear()
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
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
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls, fail_at="score_1"))
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
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    run_pipeline(cfg)
    man = read_manifest(phase_dir)
    assert man.status == "completed" and os.path.exists(f"{phase_dir}/part-0.parquet")  # resumed, not cleared
    assert man.earlier_seconds == pytest.approx(killed.earlier_seconds + 40, abs=0.02)
    assert man.total_seconds == pytest.approx(man.seconds + man.earlier_seconds, abs=0.01)
    assert phase_costs(phase_dir)["seconds"] == man.total_seconds
    # a phase run anew (another fingerprint) starts from nothing: no earlier time
    assert read_manifest(f"{cfg.run_dir()}/sft").earlier_seconds == 0.0
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    run_pipeline(load_config(None, [f"run.storage={cfg.run.storage}", "run.name=r", "scoring.batch_size=3"]))
    assert read_manifest(phase_dir).earlier_seconds == 0.0


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
        phases = fake_phases(calls, fail_at=phase if fail else None)

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
    phases = fake_phases(calls)

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


def test_an_interrupted_training_phase_resumes_its_work_at_another_layout(cfg, monkeypatch, tmp_path):
    """wmss_1 crashes at 1 worker; rerun at 2 workers x micro-batch 8 (the same 16 rows), it runs
    again in its directory as it was (its checkpoints kept, not cleared), under its fingerprint,
    and its manifest keeps the layout that fingerprint was computed with."""
    calls = []
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls, fail_at="wmss_1"))
    monkeypatch.setattr(pipeline, "ensure_ray", lambda: None)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg)
    wmss = f"{cfg.run_dir()}/wmss_1"
    fp = json.loads(open(f"{wmss}/manifest.json").read())["fingerprint"]
    open(f"{wmss}/checkpoint_marker", "w").close()  # stands in for its Ray Train checkpoints
    calls.clear()
    monkeypatch.setattr(pipeline, "build_phases", fake_phases(calls))
    run_pipeline(load_config(None, [f"run.storage={tmp_path}", "run.name=r", "scaling.num_workers=2",
                                    "training.micro_batch_size=8"]))
    assert calls == ["wmss_1", "sft_continued", "eval", "report"]
    man = json.loads(open(f"{wmss}/manifest.json").read())
    assert os.path.exists(f"{wmss}/checkpoint_marker")
    assert man["status"] == "completed" and man["fingerprint"] == fp
    assert man["layout"]["scaling.num_workers"] == 1 and man["layout"]["training.micro_batch_size"] == 16
