"""study/runner.py without Ray: which arms of a seed start when, checked against what each arm's
phase needs in the pipeline's phase graph (tests/study/test_study_run.py runs the graph on Ray);
what an arm's evaluation phase depends on."""

from __future__ import annotations

import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.config.names import FAKE_WEAK_ARMS, STUDY_ARM_LABELS
from wmss_ray.phases import build_phases
from wmss_ray.pipeline import upstream_phases
from wmss_ray.study.arms import FAKE_SHARED, arm_runs, fake_config, seed_config
from wmss_ray.study.runner import unlocked_arms

TINY = "configs/test-tiny.yaml"


def _needs(cfg, phase: str) -> set[str]:
    """Every phase ``phase`` needs in ``cfg``'s run, directly or not."""
    return upstream_phases(build_phases(cfg), (phase,)) - {phase}


@pytest.mark.parametrize("iterations", [1, 2])
def test_each_arm_starts_once_after_exactly_what_its_phase_needs(tmp_path, iterations):
    base = load_config(TINY, [f"run.storage={tmp_path}", "mix.mode=frozen", f"run.iterations={iterations}"])
    cfg, runs = seed_config(base, 1), arm_runs(base, 1)
    arms = [r.arm for r in runs]
    assert set(arms) == set(STUDY_ARM_LABELS)
    after_trunk, after_wmss = unlocked_arms("trunk", arms), unlocked_arms("wmss", arms)
    assert sorted(after_trunk + after_wmss) == sorted(arms)  # every arm once
    assert after_trunk[0] == "wmss"  # first: it unlocks the SFT arms
    assert all(unlocked_arms(a, arms) == [] for a in arms if a != "wmss")
    wmss = runs[0].phase
    assert wmss == f"wmss_{iterations}"
    for r in runs:
        if r.arm in FAKE_WEAK_ARMS:  # its own run: the trunk's phases linked, then its own WMSS
            needs = _needs(fake_config(cfg, 1, r.arm), r.phase)
            assert needs <= set(FAKE_SHARED) and r.arm in after_trunk, r.arm
        else:
            needs = _needs(cfg, r.phase)
            if r.arm == "wmss":
                assert FAKE_SHARED[-1] in needs and r.arm in after_trunk
            else:  # an SFT arm: its step count follows from WMSS's steps
                assert wmss in needs and r.arm in after_wmss, r.arm
                others = {x.phase for x in runs if x.arm != "wmss" and x.run_dir == r.run_dir}
                assert not needs & others, r.arm  # no other arm of the seed's run


def test_a_study_of_fewer_arms_unlocks_only_those(tmp_path):
    base = load_config(TINY, [f"run.storage={tmp_path}", "mix.mode=frozen",
                              "study.arms=[sft_matched_flops,wmss_shuffled_weak]"])
    arms = [r.arm for r in arm_runs(base, 0)]
    assert arms == ["wmss", "sft_matched_flops", "wmss_shuffled_weak"]
    assert unlocked_arms("trunk", arms) == ["wmss", "wmss_shuffled_weak"]
    assert unlocked_arms("wmss", arms) == ["sft_matched_flops"]


def _completed_arm(run, fingerprint: str, peak_step: int) -> None:
    """Arm ``run``'s training phase, completed after 2 steps with its peak at ``peak_step``."""
    from wmss_ray.io.manifest import Manifest

    outputs = {"model_dir": f"{run.phase_dir}/model", "steps": 2,
               "peak": {"step": peak_step, "model_dir": f"{run.phase_dir}/peak_model"}}
    Manifest(run.phase, "completed", fingerprint, "h", outputs=outputs).write(run.phase_dir)


def test_an_arms_evaluation_depends_on_its_models_and_evaluation_not_on_the_other_arms(tmp_path):
    """``eval_<arm>``'s fingerprint: the same whatever else the study lists (a grown study reuses
    it), another when the arm trained again or the evaluation settings changed; the peak is
    evaluated only when it is not the final model."""
    from wmss_ray.study.runner import arm_eval_phase

    def eval_print(arms: str, *more: str) -> tuple[str, list[str]]:
        base = load_config(TINY, [f"run.storage={tmp_path}", "mix.mode=frozen", f"study.arms=[{arms}]", *more])
        cfg = seed_config(base, 0)
        phase = arm_eval_phase(next(r for r in arm_runs(base, 0) if r.arm == "sft_matched_flops"))
        return phase.fingerprint(cfg.fingerprint_dict(), {}), sorted(phase.extra["models"])

    base = load_config(TINY, [f"run.storage={tmp_path}", "mix.mode=frozen"])
    run = next(r for r in arm_runs(base, 0) if r.arm == "sft_matched_flops")
    _completed_arm(run, "trained-once", peak_step=1)
    every, models = eval_print(",".join(a for a in STUDY_ARM_LABELS if a != "wmss"))
    assert models == [run.label, f"{run.label} (peak)"]
    assert eval_print("sft_matched_flops") == (every, models)  # no SFT-continued arm: the same
    assert eval_print("sft_matched_flops,wmss_shuffled_weak")[0] == every
    assert eval_print("sft_matched_flops", "evaluation.max_new_tokens=7")[0] != every
    assert eval_print("sft_matched_flops", "evaluation.logits_mb=64")[0] == every  # rows per forward only
    _completed_arm(run, "trained-again", peak_step=2)  # its peak is its final model now
    again, models = eval_print("sft_matched_flops")
    assert again != every and models == [run.label]


def test_the_console_says_each_arm_and_its_accuracies_as_it_lands():
    from wmss_ray.study.runner import arm_done_line

    models = {"SFT-higher-LR": {"accuracy": 0.425, "n": 300}, "SFT-higher-LR (peak)": {"accuracy": 0.45, "n": 300}}
    assert arm_done_line(0, "sft_higher_lr", models, 3, 8) == (
        "[wmss] study: seed 0 sft_higher_lr done (3/8): SFT-higher-LR 0.425, SFT-higher-LR (peak) 0.450 "
        "on 300 test problems")
