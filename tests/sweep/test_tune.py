"""Tune sweep plumbing: the param space, trial configs, shared-phase links (no Ray needed)."""

from __future__ import annotations

import os

import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.config.schema import ConfigError
from wmss_ray.sweep.driver import SHARED_PHASES, build_param_space, link_shared_phases, trial_config


def test_param_space_kinds():
    from ray import tune

    space = build_param_space({"mix.lam": {"uniform": [0.3, 0.7]}, "curriculum.beta": {"choice": [0.5, 0.8]},
                               "curriculum.alpha": {"grid": [0.0, 0.1]}})
    assert isinstance(space["mix.lam"], tune.search.sample.Float)
    assert space["mix.lam"].lower == 0.3 and space["mix.lam"].upper == 0.7
    assert space["curriculum.beta"].categories == [0.5, 0.8]
    assert space["curriculum.alpha"] == {"grid_search": [0.0, 0.1]}


@pytest.mark.parametrize("space, msg", [
    ({"training.lr": {"uniform": [1e-5, 1e-4]}}, "only mix.* and curriculum.*"),
    ({"mix.lam": {"uniform": [0.7, 0.3]}}, "low < high"),
    ({"mix.lam": {"normal": [0.5, 0.1]}}, "exactly one of"),
])
def test_bad_search_spaces_are_refused(space, msg):
    with pytest.raises(ConfigError, match=msg):
        from wmss_ray.config.loading import config_from_dict
        config_from_dict({"tune": {"search_space": space}})


def test_trial_config_and_links(tmp_path):
    base = load_config(None, [f"run.storage={tmp_path}", "run.name=base"])
    cfg = trial_config(base, {"mix.lam": 0.42, "curriculum.beta": 0.5}, "trial_00001")
    assert cfg.mix.lam == 0.42 and cfg.curriculum.beta == 0.5
    assert cfg.run_dir() == str(tmp_path / "base" / "tune" / "trial_00001")
    assert cfg.evaluation.sft_continued is False
    base_dir = tmp_path / "base"
    for p in SHARED_PHASES:
        (base_dir / p).mkdir(parents=True)
    link_shared_phases(base_dir, tmp_path / "base" / "tune" / "trial_00001")
    for p in SHARED_PHASES:
        link = tmp_path / "base" / "tune" / "trial_00001" / p
        assert link.is_symlink() and link.resolve() == (base_dir / p).resolve()
    assert not (tmp_path / "base" / "tune" / "trial_00001" / "wmss_1").exists()


def test_a_linked_phase_is_linked_to_what_it_stands_for(tmp_path):
    """A study arm links its seed run's phases, which the seed run itself links from the base run."""
    base, seed, arm = tmp_path / "base", tmp_path / "study" / "seed0", tmp_path / "study" / "seed0-arm"
    (base / "tokenize").mkdir(parents=True)
    link_shared_phases(base, seed, ("tokenize",))
    link_shared_phases(seed, arm, ("tokenize",))
    assert os.readlink(arm / "tokenize") == str((base / "tokenize").resolve())  # no chain of links


def test_a_sweep_on_object_storage_puts_its_trials_under_the_bucket():
    """The trial's run directory is a URI under the base run's (tests/test_pipeline_object_storage.py
    runs such a sweep on an S3 server)."""
    base = load_config(None, ["run.storage=s3://bucket/runs", "run.name=base"])
    cfg = trial_config(base, {"mix.lam": 0.42}, "trial_00001")
    assert cfg.run_dir() == "s3://bucket/runs/base/tune/trial_00001"


@pytest.mark.parametrize("overrides", [
    ["data.demo.n_validation=0"],
    ["models.demo=false", "models.base=/models/m0", "data.train=t.jsonl", "data.eval=e.jsonl"],
])
def test_a_sweep_without_a_validation_split_is_refused_before_it_runs(tmp_path, overrides):
    """Tune selects a trial: it must not select on data.eval (the test set)."""
    from wmss_ray.sweep.driver import run_sweep

    base = load_config(None, [f"run.storage={tmp_path}", *overrides])
    with pytest.raises(ValueError, match="validation split apart from data.eval"):
        run_sweep(base)
    assert not (tmp_path / base.run.name).exists()  # nothing ran


def test_validation_source_prefers_the_carved_split():
    from wmss_ray.data.splits import has_validation, validation_source

    demo = load_config(None)
    assert has_validation(demo)
    assert validation_source(demo, {"data": {"validation": "/r/data/validation.jsonl"}}) == "/r/data/validation.jsonl"
    carved = {"data": {"validation": "/r/data/validation.jsonl"}, "tokenize": {"validation": "/r/tokenize/validation"}}
    assert validation_source(demo, carved) == "/r/tokenize/validation"
    real = load_config(None, ["models.demo=false", "models.base=/m", "data.train=t.jsonl", "data.validation=v.jsonl"])
    assert has_validation(real) and validation_source(real, {"tokenize": {"validation": None}}) == "v.jsonl"


# ----------------------------------------------------------------------------- schema of the space


def test_space_values_keep_their_types_and_the_default_covers_the_four_knobs():
    from wmss_ray.config.loading import config_from_dict

    cfg = config_from_dict({"tune": {"search_space": {"mix.mode": {"choice": ["joint", "frozen"]},
                                                      "curriculum.formula": {"choice": ["seed", "v2"]},
                                                      "mix.lam": {"choice": [0.5, 1]}}}})
    assert cfg.tune.search_space["mix.mode"]["choice"] == ["joint", "frozen"]
    assert [type(v) for v in cfg.tune.search_space["mix.lam"]["choice"]] == [float, int]
    assert set(load_config(None).tune.search_space) == {"mix.lam", "curriculum.alpha", "curriculum.beta",
                                                        "curriculum.gamma"}
    assert config_from_dict({"tune": {"metric": "validation_loss"}}).tune.resolved_mode == "min"


@pytest.mark.parametrize("tune_section, msg", [
    ({"search_space": {"mix.lamb": {"uniform": [0.1, 0.2]}}}, "'mix.lamb': unknown key"),
    ({"search_space": {"mix.mode": {"choice": ["joint", "bogus"]}}}, "value 'bogus' is refused"),
    ({"search_space": {"mix.lam": {"choice": [1.5]}}}, "value 1.5 is refused"),
    ({"search_space": {"mix.lam": {"uniform": ["a", "b"]}}}, "needs \\[low, high\\] \\(numbers\\)"),
    ({"search_space": {"mix.lam": {"loguniform": [0.0, 0.5]}}}, "loguniform needs low > 0"),
    ({"search_space": {"mix.lam": {"grid": [0.3, 0.5]}}}, "optuna cannot enumerate a grid"),
    ({"search": "grid", "search_space": {"mix.lam": {"uniform": [0.3, 0.5]}}}, "mix.lam is a range"),
    ({"scheduler": "asha", "eval_every": 0}, "set tune.eval_every > 0"),
])
def test_bad_tune_settings_are_refused_at_load(tune_section, msg):
    from wmss_ray.config.loading import config_from_dict

    with pytest.raises(ConfigError, match=msg):
        config_from_dict({"tune": tune_section})


def test_grid_search_enumerates_choices():
    space = build_param_space({"curriculum.formula": {"choice": ["seed", "v2"]}}, search="grid")
    assert space["curriculum.formula"] == {"grid_search": ["seed", "v2"]}


def test_a_cross_section_conflict_is_refused_before_any_work(tmp_path):
    """mix.placement pool needs mix.mode frozen: the sweep refuses mode joint before running anything."""
    from wmss_ray.sweep.driver import run_sweep

    base = load_config(None, [f"run.storage={tmp_path}", "mix.placement=pool", "mix.mode=frozen",
                              'tune.search_space={"mix.mode": {"choice": ["frozen", "joint"]}}'])
    with pytest.raises(ConfigError, match="tune.search_space mix.mode='joint': invalid config"):
        run_sweep(base)
    assert not (tmp_path / base.run.name).exists()


def test_max_concurrent_counts_the_train_workers_and_fails_naming_resources():
    from wmss_ray.sweep.driver import derive_max_concurrent, trial_resources

    cfg = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "tune.cpus_per_trial=0.5"])
    assert trial_resources(cfg) == {"CPU": 2.5, "GPU": 0.0}
    assert derive_max_concurrent(cfg, {"CPU": 8.0}) == 3
    assert derive_max_concurrent(cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"max_concurrent": 1})}),
                                 {"CPU": 8.0}) == 1
    with pytest.raises(ValueError, match="needs CPU 2.5, GPU 0 .* cluster has CPU 2, GPU 0"):
        derive_max_concurrent(cfg, {"CPU": 2.0})
    gpu = load_config(None, ["scaling.use_gpu=true", "evaluation.gpus_per_actor=1", "scaling.num_workers=2",
                             "training.zero_stage=2"])
    with pytest.raises(ValueError, match="GPU 2"):
        derive_max_concurrent(gpu, {"CPU": 64.0, "GPU": 1.0})


# ----------------------------------------------------------------------------- a real sweep (Ray)


def test_wmss_tune_passes_retry_errored_and_prints_the_table(monkeypatch, capfd, tmp_path):
    import wmss_ray.cli.main as cli
    import wmss_ray.sweep.driver as sweep

    calls = []
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, retry_errored=False: calls.append(retry_errored) or [])
    # no results.csv: the table is empty and says so
    for argv in (["tune", "configs/test-tiny.yaml", "--set", f"run.storage={tmp_path}"],
                 ["tune", "configs/test-tiny.yaml", "--set", f"run.storage={tmp_path}", "--retry-errored"]):
        assert cli.main(argv) == 0
    assert calls == [False, True]
    out = capfd.readouterr().out  # the console: the original fd 1
    assert "trials on the validation split, by validation_accuracy (max)" in out and "no trial completed" in out


def test_continuing_a_sweep_with_another_config_is_refused(tmp_path):
    from wmss_ray.config.loading import save_config
    from wmss_ray.sweep.driver import SWEEP_CONFIG, check_same_sweep

    base = load_config(None, [f"run.storage={tmp_path}"])
    check_same_sweep(base, tmp_path)  # nothing saved yet: a new sweep
    save_config(base, tmp_path / SWEEP_CONFIG)
    check_same_sweep(load_config(None, [f"run.storage={tmp_path}"]), tmp_path)  # the same sweep
    other = load_config(None, [f"run.storage={tmp_path}", "tune.num_samples=3", "training.lr=0.01"])
    with pytest.raises(ValueError, match="training.lr, tune.num_samples differ"):
        check_same_sweep(other, tmp_path)


def test_paired_difference_averages_the_seeds_per_problem_against_the_control(tmp_path):
    import json

    import numpy as np

    from wmss_ray.stages.stats import paired_test, sign_flip_p_value
    from wmss_ray.sweep.control import control_steps, paired_vs_control

    rng = np.random.default_rng(0)
    n = 60
    control, s0, s1 = rng.random(n) < 0.5, rng.random(n) < 0.7, rng.random(n) < 0.6

    def write(name, correct, drop=()):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"sample_id": f"id{i}", "correct": bool(c)}) + "\n"
                                for i, c in enumerate(correct) if i not in drop))
        return path

    one = paired_vs_control([write("s0.jsonl", s0)], str(write("c.jsonl", control)))
    ref = paired_test(s0, control)  # one seed: the exact McNemar test and the same bootstrap
    assert one["diff_vs_sft"] == pytest.approx(ref.diff) and one["p_value"] == pytest.approx(ref.p_value)
    assert (one["diff_ci_low"], one["diff_ci_high"]) == pytest.approx((ref.ci_low, ref.ci_high))
    two = paired_vs_control([write("s0.jsonl", s0), write("s1.jsonl", s1, drop={3})], str(tmp_path / "c.jsonl"))
    keep = np.arange(n) != 3  # a problem missing from one seed's file is left out, not counted wrong
    d = (s0[keep].astype(float) + s1[keep]) / 2 - control[keep]
    assert two["diff_vs_sft"] == pytest.approx(d.mean()) and two["p_value"] == pytest.approx(sign_flip_p_value(d))
    assert two["diff_ci_low"] < d.mean() < two["diff_ci_high"]
    rows = [{"status": "completed", "step": 9}, {"status": "completed", "step": 9}, {"status": "completed", "step": 7},
            {"status": "stopped", "step": 3}]
    assert control_steps(rows) == 9 and control_steps(rows[3:]) is None


def test_asha_refuses_a_cluster_without_the_state_api():
    """ASHA ends stopped trials' Train runs; Ray Train frees their placement groups only through
    the State API, so a cluster without it is refused at sweep start, naming the fix."""
    from wmss_ray.sweep.driver import check_state_api

    def no_dashboard(**kwargs):
        raise ConnectionError("Failed to connect to API server at 127.0.0.1:8265")

    asha = load_config("configs/test-tiny.yaml", ["tune.scheduler=asha", "tune.eval_every=1", "tune.grace_period=1"])
    with pytest.raises(RuntimeError, match=r"State API .* \(ConnectionError: Failed to connect .* its dashboard"):
        check_state_api(asha, list_actors=no_dashboard)
    seen = []
    check_state_api(asha, list_actors=lambda **kw: seen.append(kw))  # served: nothing to say
    assert seen and seen[0]["limit"] == 1 and "address" in seen[0]  # this process's cluster, by its GCS
    check_state_api(load_config("configs/test-tiny.yaml", ["tune.scheduler=none"]), list_actors=no_dashboard)


def test_the_console_line_of_a_trial():
    from wmss_ray.sweep.reports import trial_line, trial_lines_callback

    assert trial_line("start", "trial_1", {"mix.lam": 0.412345, "curriculum.formula": "v2"}, None,
                      "validation_accuracy") == "[wmss] tune: trial_1 started: mix.lam 0.4123, curriculum.formula v2"
    assert trial_line("complete", "trial_1", None, {"validation_accuracy": 0.625, "step": 40, "final": True},
                      "validation_accuracy") == "[wmss] tune: trial_1 done at step 40: validation_accuracy 0.625"
    assert "stopped early at step 8" in trial_line("complete", "t", None, {"step": 8, "final": False}, "validation_loss")
    assert trial_line("error", "t", None, None, "x").startswith("[wmss] tune: t failed")
    from ray.tune import Callback

    assert isinstance(trial_lines_callback("validation_accuracy"), Callback)
