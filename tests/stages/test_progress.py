"""``stages/progress.py``: the console's start / end lines and the training probe."""

from __future__ import annotations

import json

from wmss_ray.config.loading import config_from_dict
from wmss_ray.io.manifest import Manifest
from wmss_ray.stages import progress as P


def _man(tmp_path, name, counts):
    d = tmp_path / name
    d.mkdir()
    Manifest(phase=name, status="completed", fingerprint="f", config_hash="h", counts=counts).write(d)
    return d


def test_planned_steps_follow_the_data_plan():
    cfg = config_from_dict({"training": {"micro_batch_size": 4, "grad_accum": 2}, "scaling": {"num_workers": 2}})
    assert P.planned_steps(cfg, 100, 1.0) == 7  # ceil(100 / 16)
    assert P.planned_steps(cfg, 96, 2.0) == 12
    assert P.planned_steps(cfg, None, 1.0) is None
    capped = config_from_dict({"training": {"micro_batch_size": 4, "max_steps": 3}})
    assert P.planned_steps(capped, 100, 1.0) == 3


def test_start_lines_say_what_each_phase_will_do_in_numbers(tmp_path):
    cfg = config_from_dict({"training": {"micro_batch_size": 8, "max_steps": 50}, "scaling": {"num_workers": 2}})
    run = str(tmp_path)
    _man(tmp_path, "tokenize", {"rows_ok": 160})
    _man(tmp_path, "curriculum_1", {"draws": 160})
    _man(tmp_path, "wmss_1", {"steps": 10})
    assert P.phase_plan("sft", cfg, run) == ("SFT M0 -> M1 on 160 rows: 10 steps, 2 workers", 10, "steps")
    what, total, unit = P.phase_plan("wmss_1", cfg, run)
    assert what == "WMSS M1 -> M2 (lam 0.5, joint) on 160 draws: 10 steps, 2 workers" and total == 10
    assert P.phase_plan("sft_continued", cfg, run)[1:] == (10, "steps")
    assert P.phase_plan("score_1", cfg, run)[0] == "entropy of 160 rows under weak M0 and strong M1, 1 actor(s)"
    assert P.phase_plan("curriculum_1", cfg, run)[0] == "drawing 160 samples (formula seed)"
    assert P.phase_plan("eval", cfg, run)[0].endswith(f"on {cfg.data.demo.n_eval} test rows")
    assert P.phase_plan("report", cfg, run) == ("", None, "")
    assert P.start_line("report", "") == "[wmss] report started"


def test_end_lines_carry_time_throughput_and_the_figure_that_matters():
    assert P.end_line("sft", "completed", 125.0, P.phase_result("sft", {"steps": 10, "loss": 1.23456}, {}, 125.0)) == \
        "[wmss] sft done in 2:05: 10 steps, final loss 1.2346, 0.08/s"
    tok = P.phase_result("tokenize", {"rows_in": 100, "rows_ok": 90, "rows_rejected": 2, "rows_validation": 8}, {}, 4.0)
    assert tok == "90 rows kept, 2 rejected, 8 to validation, 25/s"
    assert P.phase_result("score_1", {"rows_scored": 10000}, {}, 8.85).endswith("rows scored, 1,130/s")
    assert P.phase_result("eval", {}, {"models": {"M1": {"accuracy": 0.5}, "WMSS": {"accuracy": 0.625}}}, 3.0) == \
        "M1 0.500, WMSS 0.625"
    assert P.end_line("wmss_1", "stopped", 5.0, "") == "[wmss] wmss_1 stopped in 5s"


def test_training_probe_reads_the_last_logged_step(tmp_path):
    probe = P.training_probe(str(tmp_path), "sft")
    assert probe() == 0  # no file yet
    (tmp_path / "sft").mkdir()
    path = tmp_path / "sft" / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 5}) + "\n")
    assert probe() == 5
    path.write_text(json.dumps({"step": 1}) + "\n{\"step\": 6")  # a line being written
    assert probe() == 0


def test_the_controls_say_their_steps_from_the_runner_and_end_with_their_loss(tmp_path):
    """The equal-compute controls' steps follow from the WMSS phases, which the runner knows
    (``phases.Phase.planned_steps``); a sweep's shared control has no WMSS phase in its run dir."""
    cfg = config_from_dict({"scaling": {"num_workers": 2}})
    run = str(tmp_path)  # no manifests: a sweep's <run>/tune
    assert P.phase_plan("sft_continued", cfg, run, steps=7) == \
        ("SFT-continued from M1 (equal compute): 7 steps, 2 workers", 7, "steps")
    assert P.phase_plan("sft_continued", cfg, run)[0] == "SFT-continued from M1 (equal compute): ? steps, 2 workers"
    assert P.phase_plan("sft_matched_flops", cfg, run, steps=9) == ("SFT-matched-FLOPs from M1: 9 steps, 2 workers", 9,
                                                                    "steps")
    assert P.phase_result("sft_higher_lr", {"steps": 4, "loss": 0.5}, {}, 2.0) == "4 steps, final loss 0.5000, 2/s"


def test_the_runner_knows_each_controls_steps_from_the_wmss_phases():
    from wmss_ray.phases import RunContext, build_phases
    from wmss_ray.training.controls import arm_steps

    cfg = config_from_dict({"run": {"iterations": 2}, "mix": {"mode": "frozen"},
                            "controls": {"arms": ["sft_matched_flops", "sft_higher_lr"]}})
    ctx = RunContext(cfg, run_dir="/nonexistent")
    ctx.outputs = {"wmss_1": {"steps": 10}, "wmss_2": {"steps": 5}}
    planned = {p.name: p.planned_steps(ctx) for p in build_phases(cfg) if p.planned_steps}
    assert planned == {"sft_continued": 15, "sft_higher_lr": 15,
                       "sft_matched_flops": arm_steps("sft_matched_flops", 15, "frozen")}
    assert planned["sft_matched_flops"] == 20  # a frozen WMSS step is 4/3 of an SFT step
