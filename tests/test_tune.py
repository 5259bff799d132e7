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


# ----------------------------------------------------------------------------- schema of the space


def test_space_values_keep_their_types_and_the_default_covers_the_four_knobs():
    from wmss_ray.config_loading import config_from_dict

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
    from wmss_ray.config_loading import config_from_dict

    with pytest.raises(ConfigError, match=msg):
        config_from_dict({"tune": tune_section})


def test_grid_search_enumerates_choices():
    space = build_param_space({"curriculum.formula": {"choice": ["seed", "v2"]}}, search="grid")
    assert space["curriculum.formula"] == {"grid_search": ["seed", "v2"]}


def test_a_cross_section_conflict_is_refused_before_any_work(tmp_path):
    """mix.placement pool needs mix.mode frozen: the sweep refuses mode joint before running anything."""
    from tune.sweep import run_sweep

    base = load_config(None, [f"run.storage={tmp_path}", "mix.placement=pool", "mix.mode=frozen",
                              'tune.search_space={"mix.mode": {"choice": ["frozen", "joint"]}}'])
    with pytest.raises(ConfigError, match="tune.search_space mix.mode='joint': invalid config"):
        run_sweep(base)
    assert not (tmp_path / base.run.name).exists()


def test_max_concurrent_counts_the_train_workers_and_fails_naming_resources():
    from tune.sweep import derive_max_concurrent, trial_resources

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

TINY_SWEEP = ["training.max_steps=2", "tune.num_samples=4", "tune.search=optuna", "tune.scheduler=asha",
              "tune.eval_every=1", "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_steps=2",
              "tune.eval_samples=8", "tune.metric=validation_loss", "tune.max_concurrent=1",
              'tune.search_space={"mix.lam": {"uniform": [0.05, 1.0]}, "curriculum.formula": {"choice": ["seed", "v2"]}}']


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tmp_path_factory):
    from tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    cfg = load_config("configs/test-tiny.yaml", [f"run.storage={root}", *TINY_SWEEP])
    return cfg, run_sweep(cfg)


def test_an_asha_sweep_with_optuna_stops_a_trial_early(asha_sweep):
    import csv
    from pathlib import Path

    cfg, grid = asha_sweep
    assert len(grid) == 4 and grid.errors == []
    rows = list(csv.DictReader(open(Path(cfg.run_dir()) / "tune" / "results.csv")))
    assert len(rows) == 4
    status = [r["status"] for r in rows]
    assert "stopped" in status and "completed" in status, status
    for r in grid:  # every trial reported after step 1 on the seeded subsample
        steps = list(r.metrics_dataframe["step"])
        assert steps[0] == 1 and r.metrics_dataframe["n_validation"].iloc[0] == 8
        if r.metrics.get("final"):
            assert steps == [1, 2] and r.metrics["n_validation"] == cfg.data.demo.n_validation
        else:
            assert steps == [1]
    for r in rows:
        assert r["curriculum.formula"] in ("seed", "v2") and 0.05 <= float(r["mix.lam"]) <= 1.0


def test_trials_link_the_shared_phases_and_run_their_own_curriculum_on_validation(asha_sweep):
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from tune.trial import SHARED_PHASES

    cfg, grid = asha_sweep
    base = Path(cfg.run_dir())
    weights = {}
    for r in grid:
        trial = base / "tune" / Path(r.path).name
        assert all((trial / p).is_symlink() and (trial / p).resolve() == (base / p).resolve() for p in SHARED_PHASES)
        manifest = json.loads((trial / "curriculum_1" / "manifest.json").read_text())
        weights[r.config["curriculum.formula"]] = pq.read_table(trial / "curriculum_1" / "weights.parquet")["weight"]
        assert manifest["status"] == "completed"
        if r.metrics.get("final"):  # judged on the whole validation split, never on data.eval
            rows = [json.loads(x) for x in (trial / "validation" / "eval_WMSS.jsonl").read_text().splitlines()]
            assert len(rows) == r.metrics["n_validation"] == cfg.data.demo.n_validation
            assert r.metrics["validation_accuracy"] == sum(x["correct"] for x in rows) / len(rows)
            assert r.metrics["validation_loss"] > 0 and not (trial / "eval").exists()
    if len(weights) == 2:  # each trial drew from its own curriculum formula's weights
        assert weights["seed"].to_pylist() != weights["v2"].to_pylist()


def test_completed_trials_are_paired_with_one_shared_control_and_the_best_is_tested_once(asha_sweep):
    import csv
    import json
    from pathlib import Path

    from wmss_ray.evaluation import read_per_sample
    from wmss_ray.manifest import read_manifest
    from wmss_ray.stats import paired_test_per_sample

    cfg, grid = asha_sweep
    root = Path(cfg.run_dir()) / "tune"
    control = read_manifest(str(root / "baseline"))  # one SFT-continued for all trials, equal compute
    assert control.status == "completed" and control.counts["steps"] == 2
    control_rows = read_per_sample(root / "baseline" / "validation" / "eval_SFT-continued.jsonl")
    assert len(control_rows) == cfg.data.demo.n_validation
    rows = {r["trial"]: r for r in csv.DictReader(open(root / "results.csv"))}
    for name, r in rows.items():
        if r["status"] != "completed":
            assert r["diff_vs_sft"] == "" and r["p_value"] == ""
            continue
        ref = paired_test_per_sample(read_per_sample(root / name / "validation" / "eval_WMSS.jsonl"), control_rows)
        diff, lo, hi, p = (float(r[k]) for k in ("diff_vs_sft", "diff_ci_low", "diff_ci_high", "p_value"))
        assert diff == pytest.approx(ref.diff) and p == pytest.approx(ref.p_value)  # one seed: McNemar
        assert lo <= diff <= hi and r["seeds"] == "1"
    curves = list(csv.DictReader(open(root / "curves.csv")))
    assert len(curves) == sum(len(r.metrics_dataframe) for r in grid)
    final = json.loads((root / "final.json").read_text())
    best = min((r for r in rows.values() if r["status"] == "completed"), key=lambda r: float(r["validation_loss"]))
    assert final["trial"] == best["trial"] and final["eval_set"]["name"] == "test"
    assert final["paired"][0]["n"] == final["eval_set"]["n"] == min(cfg.data.demo.n_eval, cfg.evaluation.max_samples
                                                                     or cfg.data.demo.n_eval)
    eval_files = sorted(p.name for p in (root / "final").glob("eval_*.jsonl"))
    assert eval_files == ["eval_SFT-continued.jsonl", "eval_WMSS_seed_0.jsonl"]
    page = (root / "page" / "index.html").read_text()  # the sweep page, from these very files
    assert all(name in page for name in rows) and f"{final['paired'][0]['diff']:+.4f}" in page
    assert all((root / "page" / png).stat().st_size > 1000 for png in
               ("metric_vs_lam.png", "knobs.png", "learning_curves.png", "categories.png"))


def test_the_sweep_prints_the_table_then_the_held_out_result_last(asha_sweep):
    from tune.sweep import summarize

    cfg, _ = asha_sweep
    lines = summarize(cfg).splitlines()
    assert lines[0].startswith("trials on the validation split, by validation_loss (min)")
    assert sum(" completed " in f" {line} " for line in lines) >= 1 and any("stopped" in line for line in lines)
    assert lines[-2].startswith("held-out test (") and "best trial trial_" in lines[-2]
    assert lines[-1].strip().startswith("WMSS seed 0:") and "McNemar p" in lines[-1]


def test_best_yaml_is_a_complete_config_of_the_best_completed_trial(asha_sweep):
    from pathlib import Path

    cfg, grid = asha_sweep
    best = load_config(Path(cfg.run_dir()) / "tune" / "best.yaml")
    done = [r for r in grid if r.metrics.get("final")]
    top = min(done, key=lambda r: r.metrics["validation_loss"])
    assert best.mix.lam == top.config["mix.lam"] and best.curriculum.formula == top.config["curriculum.formula"]
    assert best.run.name == f"{cfg.run.name}-best" and best.run.storage == cfg.run.storage
    assert best.training == cfg.training and best.data == cfg.data  # everything else is the base config


def test_wmss_run_best_yaml_reproduces_the_chosen_trial_and_its_control(asha_sweep):
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from tune.trial import SHARED_PHASES
    from wmss_ray import cli
    from wmss_ray.manifest import read_manifest

    cfg, _ = asha_sweep
    root = Path(cfg.run_dir()) / "tune"
    assert cli.main(["run", str(root / "best.yaml")]) == 0
    run = Path(load_config(root / "best.yaml").run_dir())
    assert all((run / p).is_symlink() for p in SHARED_PHASES)  # the sweep's shared phases, not rerun
    final = json.loads((root / "final.json").read_text())

    def weights(model_dir: str) -> dict:
        return {k: v for f in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(f).items()}

    for ours, theirs in ((run / "wmss_1", root / final["trial"] / "wmss_1"), (run / "baseline", root / "baseline")):
        a, b = (weights(read_manifest(str(d)).outputs["model_dir"]) for d in (ours, theirs))
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ours.name  # bit-identical
    models = json.loads((run / "eval" / "eval_results.json").read_text())["models"]
    assert models["WMSS"]["accuracy"] == final["wmss"][0]["accuracy"]  # the same test set, the same answer
    assert models["SFT-continued"]["accuracy"] == final["sft_continued"]["accuracy"]
    assert (run / "report" / "report.html").exists()


def test_running_the_sweep_again_continues_it_without_rerunning_trials(asha_sweep):
    from pathlib import Path

    from tune.sweep import run_sweep

    cfg, grid = asha_sweep
    root = Path(cfg.run_dir()) / "tune"
    trials = sorted(p for p in root.iterdir() if p.name.startswith("trial_"))
    assert len(trials) == 4

    def traces() -> dict[str, tuple]:  # a rerun would append a train start and rewrite an eval
        return {t.name: ((t / "wmss_1" / "workers.jsonl").read_text(),
                         sorted((e.parent.name, e.stat().st_mtime_ns) for e in t.glob("validation*/eval_results.json")))
                for t in trials}

    def shared() -> tuple:  # the control is not trained again, the test set not read again
        return ((root / "baseline" / "workers.jsonl").read_text(),
                (root / "baseline" / "validation" / "eval_results.json").stat().st_mtime_ns,
                (root / "final" / "eval_results.json").stat().st_mtime_ns)

    before, before_shared = traces(), shared()
    again = run_sweep(cfg)
    assert sorted(Path(r.path).name for r in again) == sorted(Path(r.path).name for r in grid)
    assert traces() == before  # no trial ran again, finished or stopped
    assert shared() == before_shared
    assert sorted(p for p in root.iterdir() if p.name.startswith("trial_")) == trials


def test_wmss_tune_passes_retry_errored_and_prints_the_table(monkeypatch, capsys, tmp_path):
    import tune.sweep as sweep
    from wmss_ray import cli

    calls = []
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, retry_errored=False: calls.append(retry_errored) or [])
    # no results.csv: the table is empty and says so
    for argv in (["tune", "configs/test-tiny.yaml", "--set", f"run.storage={tmp_path}"],
                 ["tune", "configs/test-tiny.yaml", "--set", f"run.storage={tmp_path}", "--retry-errored"]):
        assert cli.main(argv) == 0
    assert calls == [False, True]
    out = capsys.readouterr().out
    assert "trials on the validation split, by validation_accuracy (max)" in out and "no trial completed" in out


def test_continuing_a_sweep_with_another_config_is_refused(tmp_path):
    from wmss_ray.config_loading import save_config
    from tune.sweep import SWEEP_CONFIG, check_same_sweep

    base = load_config(None, [f"run.storage={tmp_path}"])
    check_same_sweep(base, tmp_path)  # nothing saved yet: a new sweep
    save_config(base, tmp_path / SWEEP_CONFIG)
    check_same_sweep(load_config(None, [f"run.storage={tmp_path}"]), tmp_path)  # the same sweep
    other = load_config(None, [f"run.storage={tmp_path}", "tune.num_samples=3", "training.lr=0.01"])
    with pytest.raises(ValueError, match="training.lr, tune.num_samples differ"):
        check_same_sweep(other, tmp_path)


def test_a_trial_over_two_seeds_reports_their_mean_in_lockstep(asha_sweep):
    import json

    import pyarrow.parquet as pq

    from pathlib import Path

    from tune.trial import run_trial, seed_run_dirs
    from wmss_ray.stats import mean_and_spread

    sweep_cfg, _ = asha_sweep  # its base run's shared phases (up to scoring) serve this trial too
    cfg = load_config("configs/test-tiny.yaml", [f"run.storage={sweep_cfg.run.storage}", *TINY_SWEEP, "tune.seeds=2"])
    reports: list[dict] = []
    final = run_trial(cfg, {"mix.lam": 0.5}, "seeds_trial", report=reports.append)
    dirs = seed_run_dirs(Path(cfg.run_dir()) / "tune", "seeds_trial", 2)
    assert [d.name for d in dirs] == ["seeds_trial", "seeds_trial-seed1"] and all(d.is_dir() for d in dirs)
    draws = [pq.read_table(d / "curriculum_1" / "sampled_ids.parquet")["sample_id"].to_pylist() for d in dirs]
    assert draws[0] != draws[1]  # curriculum.seed = run.seed + i: another draw (and data order)
    assert [(r["step"], r["final"], r["seeds"], r["n_validation"]) for r in reports] == \
        [(1, False, 2, 8), (2, True, 2, cfg.data.demo.n_validation)]
    accs = [json.loads((d / "validation" / "eval_results.json").read_text())["models"]["WMSS"]["accuracy"]
            for d in dirs]
    mean, std, _, _ = mean_and_spread(accs)
    assert final == reports[-1] and final["validation_accuracy"] == pytest.approx(mean)
    assert final["accuracy_std"] == pytest.approx(std) and final["equal_steps"]
    losses = [[json.loads(line)["loss"] for line in (d / "wmss_1" / "metrics.jsonl").read_text().splitlines()]
              for d in dirs]
    assert len(losses[0]) == len(losses[1]) == 2 and losses[0] != losses[1]
    assert not any((d / "wmss_1" / "interim_model").exists() for d in dirs)


def test_paired_difference_averages_the_seeds_per_problem_against_the_control(tmp_path):
    import json

    import numpy as np

    from tune.baseline import control_steps, paired_vs_control
    from wmss_ray.stats import paired_test, sign_flip_p_value

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
