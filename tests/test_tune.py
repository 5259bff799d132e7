"""Tune sweep plumbing: the param space, trial configs, shared-phase links (no Ray needed)."""

from __future__ import annotations

import pytest

from tune.sweep import SHARED_PHASES, build_param_space, link_shared_phases, trial_config
from wmss_ray.config import ConfigError
from wmss_ray.config_loading import load_config


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
        from wmss_ray.config_loading import config_from_dict
        config_from_dict({"tune": {"search_space": space}})


def test_trial_config_and_links(tmp_path):
    base = load_config(None, [f"run.storage={tmp_path}", "run.name=base"])
    cfg = trial_config(base, {"mix.lam": 0.42, "curriculum.beta": 0.5}, "trial_00001")
    assert cfg.mix.lam == 0.42 and cfg.curriculum.beta == 0.5
    assert cfg.run_dir() == str(tmp_path / "base" / "tune" / "trial_00001")
    assert cfg.evaluation.baseline is False
    base_dir = tmp_path / "base"
    for p in SHARED_PHASES:
        (base_dir / p).mkdir(parents=True)
    link_shared_phases(base_dir, tmp_path / "base" / "tune" / "trial_00001")
    for p in SHARED_PHASES:
        link = tmp_path / "base" / "tune" / "trial_00001" / p
        assert link.is_symlink() and link.resolve() == (base_dir / p).resolve()
    assert not (tmp_path / "base" / "tune" / "trial_00001" / "wmss_1").exists()


def test_a_sweep_on_object_storage_is_refused_before_any_work():
    from tune.sweep import run_sweep

    base = load_config(None, ["run.storage=s3://bucket/runs"])
    with pytest.raises(ValueError, match="s3://bucket/runs: tune sweeps need a local or shared-filesystem"):
        run_sweep(base)


@pytest.mark.parametrize("overrides", [
    ["data.demo.n_validation=0"],
    ["models.demo=false", "models.base=/models/m0", "data.train=t.jsonl", "data.eval=e.jsonl"],
])
def test_a_sweep_without_a_validation_split_is_refused_before_it_runs(tmp_path, overrides):
    """Tune selects a trial: it must not select on data.eval (the test set)."""
    from tune.sweep import run_sweep

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
