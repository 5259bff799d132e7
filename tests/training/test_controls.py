"""The control arms (``controls.arms``, ``training/controls.py``): their step counts (the FLOPs
formula the GPU check uses), their settings, their phases and fingerprints, and what each
arm's phase hands ``train_phase``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wmss_ray.config.loading import ConfigError, load_config
from wmss_ray.phases import RunContext, build_phases
from wmss_ray.training.controls import arm_overrides, arm_steps, wmss_step_flops_ratio

REPO = Path(__file__).resolve().parents[2]
ARMS = ["sft_matched_flops", "sft_higher_lr", "sft_label_smoothing"]


def test_matched_flops_steps_follow_the_gpu_checks_flops_formula():
    """``benchmarks/gpu_check_setup.flops_per_token`` (the one the GPU check reports MFU with):
    trained + frozen over trained is the frozen ratio, 2 trained over 1 the joint one, at any
    shape and length; the arm trains ``round(wmss_steps x ratio)`` steps."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check_setup import SHAPES, flops_per_token
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for shape in SHAPES:
        for seq in (128.0, 1000.0):
            sft = flops_per_token(4_000_000_000, shape, seq, trained=1, frozen=0)
            frozen = flops_per_token(4_000_000_000, shape, seq, trained=1, frozen=1)
            joint = flops_per_token(4_000_000_000, shape, seq, trained=2, frozen=0)
            assert frozen / sft == pytest.approx(wmss_step_flops_ratio("frozen"), rel=1e-12)
            assert joint / sft == pytest.approx(wmss_step_flops_ratio("joint"), rel=1e-12)
    assert arm_steps("sft_matched_flops", 6, "frozen") == 8
    assert arm_steps("sft_matched_flops", 6, "joint") == 12
    assert arm_steps("sft_matched_flops", 6, "frozen", "uniform") == 6  # no weak forward
    assert arm_steps("sft_higher_lr", 6, "joint") == arm_steps("sft_label_smoothing", 6, "joint") == 6


def test_each_arm_changes_one_setting():
    cfg = load_config(None, ["training.lr=3e-4", "controls.higher_lr_factor=3", "controls.label_smoothing=0.2"])
    (lr,) = arm_overrides("sft_higher_lr", cfg)
    assert lr.startswith("training.lr=") and float(lr.split("=")[1]) == pytest.approx(9e-4)
    assert arm_overrides("sft_label_smoothing", cfg) == ["training.label_smoothing=0.2"]
    assert arm_overrides("sft_matched_flops", cfg) == []
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["controls.arms=[sft_higher_lr, sft_higher_lr]"])
    with pytest.raises(ConfigError, match="controls.arms"):
        load_config(None, ["controls.arms=[sft_shuffled]"])


def test_arms_are_phases_after_wmss_with_their_own_fingerprints(tmp_path):
    cfg = load_config(None, [f"run.storage={tmp_path}", f"controls.arms=[{', '.join(ARMS)}]"])
    names = [p.name for p in build_phases(cfg)]
    assert names[-5:] == [*ARMS, "eval", "report"] and names.index("wmss_1") < names.index(ARMS[0])
    assert set(ARMS) <= set(next(p for p in build_phases(cfg) if p.name == "eval").needs)

    def prints(c):
        fp: dict[str, str] = {}
        for p in build_phases(c):
            fp[p.name] = p.fingerprint(c.fingerprint_dict(), fp)
        return fp

    base = prints(cfg)
    changed = prints(load_config(None, [f"run.storage={tmp_path}", f"controls.arms=[{', '.join(ARMS)}]",
                                        "controls.higher_lr_factor=4"]))
    assert {n for n in base if base[n] != changed[n]} == {"sft_higher_lr", "eval", "report"}
    mode = prints(load_config(None, [f"run.storage={tmp_path}", f"controls.arms=[{', '.join(ARMS)}]",
                                     "mix.mode=frozen"]))
    assert {"sft_matched_flops", "wmss_1"} <= {n for n in base if base[n] != mode[n]}


@pytest.mark.parametrize("arm, steps, lr, smoothing", [("sft_matched_flops", 8, 1e-3, 0.0),
                                                       ("sft_higher_lr", 6, 2e-3, 0.0),
                                                       ("sft_label_smoothing", 6, 1e-3, 0.1)])
def test_each_arm_trains_sft_from_m1_with_its_steps_and_setting(arm, steps, lr, smoothing, tmp_path, monkeypatch):
    from wmss_ray.training import trainer

    cfg = load_config(None, [f"run.storage={tmp_path}", f"controls.arms=[{arm}]", "mix.mode=frozen"])
    seen = {}

    def fake_train_phase(c, phase, **kw):
        seen.update(cfg=c, phase=phase, **kw)
        return trainer.TrainResult(model_dir="/m", metrics_path="/m.jsonl", steps=kw["exact_steps"])

    monkeypatch.setattr(trainer, "train_phase", fake_train_phase)
    ctx = RunContext(cfg)
    ctx.outputs = {"sft": {"model_dir": "/m1"}, "wmss_1": {"steps": 6}, "tokenize": {"tokenized": "/tok"}}
    ctx.fingerprints = {arm: "fp"}
    phase = next(p for p in build_phases(cfg) if p.name == arm)
    out = phase.run(ctx)
    assert (seen["phase"], seen["strong_init"], seen["weak_init"], seen["exact_steps"]) == ("sft", "/m1", None, steps)
    assert seen["out_dir"].endswith(f"/{arm}") and seen["fingerprint"] == "fp"
    assert seen["cfg"].training.lr == pytest.approx(lr) and seen["cfg"].training.label_smoothing == smoothing
    assert out["outputs"]["steps"] == steps
