"""study/arms.py: each seed's and each fake-weak arm's run config, where every arm is trained, and
the settings a study cannot honour, refused before anything runs."""

from __future__ import annotations

import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.config.names import STUDY_ARM_LABELS
from wmss_ray.config.schema import ConfigError
from wmss_ray.phases import build_phases
from wmss_ray.study.arms import arm_runs, check_study, fake_config, seed_config, study_root

TINY = "configs/test-tiny.yaml"


def _base(tmp_path, *overrides):
    return load_config(TINY, [f"run.storage={tmp_path}", "mix.mode=frozen", *overrides])


def test_seed_configs_differ_only_in_the_training_seed_and_share_the_data_phases(tmp_path):
    base = _base(tmp_path, "run.seed=7")
    s0, s2 = seed_config(base, 0), seed_config(base, 2)
    assert s0.train_seed == 7 and s2.train_seed == 9 and s2.run.seed == 7  # the corpus and M0 keep run.seed
    assert s2.run_dir() == f"{study_root(base)}/seed2"
    assert s2.controls.arms == ["sft_matched_flops", "sft_higher_lr", "sft_label_smoothing"]
    assert s2.evaluation.sft_continued
    prints = {}
    for cfg in (base, s0, s2):
        done: dict[str, str] = {}
        for p in build_phases(cfg):
            done[p.name] = p.fingerprint(cfg.fingerprint_dict(), done)
        prints[cfg.run.name] = done
    for shared in ("data", "phase0", "tokenize"):  # linked from the base run: the same inputs
        assert prints["seed2"][shared] == prints["seed0"][shared] == prints[base.run.name][shared]
    for own in ("sft", "curriculum_1", "wmss_1", "sft_continued", "sft_higher_lr"):
        assert prints["seed2"][own] != prints["seed0"][own]
    # seed 0 is the base run's own training seed: its phases are the base's (no new key hashed)
    assert prints["seed0"]["wmss_1"] == prints[base.run.name]["wmss_1"]


def test_a_fake_weak_arm_changes_only_the_weak_side_of_its_seed(tmp_path):
    base = _base(tmp_path)
    s1 = seed_config(base, 1)
    f = fake_config(s1, 1, "wmss_entropy_matched_weak")
    assert f.mix.weak_source == "entropy_matched" and f.train_seed == s1.train_seed
    assert f.run_dir() == f"{study_root(base)}/seed1-wmss_entropy_matched_weak"
    assert f.training == s1.training and f.curriculum == s1.curriculum and f.data == s1.data


def test_arm_runs_name_every_arm_once_with_its_phase(tmp_path):
    base = _base(tmp_path)
    runs = {r.arm: r for r in arm_runs(base, 1)}
    assert list(runs) == list(STUDY_ARM_LABELS)
    assert runs["wmss"].phase == "wmss_1" and runs["sft_matched_updates"].phase == "sft_continued"
    assert runs["sft_higher_lr"].phase_dir.endswith("study/seed1/sft_higher_lr")
    assert runs["wmss_shuffled_weak"].phase_dir.endswith("study/seed1-wmss_shuffled_weak/wmss_1")
    few = _base(tmp_path, "study.arms=[sft_matched_flops]")
    assert [r.arm for r in arm_runs(few, 0)] == ["wmss", "sft_matched_flops"]
    assert not seed_config(few, 0).evaluation.sft_continued


@pytest.mark.parametrize("overrides, words", [
    (["mix.mode=joint"], "needs mix.mode: frozen"),
    (["run.iterations=2"], "run.iterations 1"),
    (["mix.weak_source=uniform"], "mix.weak_source: model"),
    (["controls.arms=[sft_higher_lr]"], "study.arms"),
    (["data.demo.n_validation=0"], "validation split"),
])
def test_what_a_study_cannot_honour_fails_at_once(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        check_study(_base(tmp_path, *overrides))
    check_study(_base(tmp_path, "mix.mode=joint", "study.arms=[sft_matched_flops]"))  # SFT arms only: fine


def test_a_study_continued_at_another_validation_cadence_is_refused_naming_the_arm(tmp_path):
    from wmss_ray.io.manifest import Manifest, now
    from wmss_ray.study.arms import check_cadence, record_cadence

    base = load_config(None, [f"run.storage={tmp_path}", "mix.mode=frozen", "study.seeds=2", "study.validate_every=5"])
    arm = arm_runs(base, 1)[3]
    Manifest(phase=arm.phase, status="completed", fingerprint="f", config_hash="h", inputs={},
             started_at=now()).write(arm.phase_dir)
    record_cadence(base, arm)
    check_cadence(base)  # the same cadence: continued
    record_cadence(load_config(None, [f"run.storage={tmp_path}", "study.validate_every=9"]), arm)  # kept as it was
    other = load_config(None, [f"run.storage={tmp_path}", "mix.mode=frozen", "study.seeds=2", "study.validate_every=50"])
    with pytest.raises(ConfigError, match=rf"study.validate_every is 50, but .*seed1.*{arm.phase} selected its peak "
                                          r"among validations every 5 steps"):
        check_cadence(other)
    Manifest(phase=arm.phase, status="failed", fingerprint="f", config_hash="h", inputs={},
             started_at=now()).write(arm.phase_dir)
    with pytest.raises(ConfigError, match="every 5 steps"):  # interrupted: it would resume with its peak so far
        check_cadence(other)
