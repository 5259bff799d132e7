"""The tune sweep on a real local Ray cluster (the tiny demo world): a 2-trial ASHA + Optuna sweep,
run once for the module on the session's tiny run (whose shared phases it reuses), with its shared
control, held-out test, page and best.yaml; a rerun that continues it; a 2-seed trial of the
sweep's completed trial's configuration on the same base run, whose seed 0 (trained in chunks) is
checked against that one-seed trial (one Train run). The checks without Ray: test_tune.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.io.manifest import read_manifest
from wmss_ray.sweep.trial import SHARED_PHASES

# 2 trials: with this seed (Optuna, run.seed 0) the first completes and the second is stopped at
# step 1 by ASHA (worse than the first there: with one result at the rung, the cutoff is that
# result); every trial costs ~15-30 s of Ray Train start-up on the 2-core machine, so no third.
TINY_SWEEP = ["tune.num_samples=2", "tune.search=optuna", "tune.scheduler=asha",
              "tune.eval_every=1", "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_steps=2",
              "tune.eval_samples=8", "tune.metric=validation_loss", "tune.max_concurrent=1",
              'tune.search_space={"mix.lam": {"uniform": [0.05, 1.0]}, "curriculum.formula": {"choice": ["seed", "v2"]}}']


@pytest.fixture(scope="module")
def asha_sweep(tiny_job_run, ray_cluster):
    """The sweep on the session's tiny run (tests/conftest.py::tiny_job_run): tune.* is in no
    phase's fingerprint, so its shared phases (data ... score_1) are that run's, not trained again
    (as a user sweeping after `wmss run` would see); the sweep writes only under <run>/tune and
    <name>-best."""
    from wmss_ray.sweep.driver import run_sweep

    if tiny_job_run.status != "SUCCEEDED":
        pytest.fail(f"the tiny pipeline job {tiny_job_run.job_id} ended {tiny_job_run.status}")
    cfg = load_config("configs/test-tiny.yaml", [f"run.storage={tiny_job_run.cfg.run.storage}", *TINY_SWEEP])
    before = {p: read_manifest(str(Path(cfg.run_dir()) / p)).finished_at for p in SHARED_PHASES}
    grid = run_sweep(cfg)
    assert {p: read_manifest(str(Path(cfg.run_dir()) / p)).finished_at for p in SHARED_PHASES} == before
    return cfg, grid


def test_an_asha_sweep_with_optuna_stops_a_trial_early(asha_sweep):
    import csv

    cfg, grid = asha_sweep
    assert len(grid) == 2 and grid.errors == []
    rows = list(csv.DictReader(open(Path(cfg.run_dir()) / "tune" / "results.csv")))
    assert len(rows) == 2
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

    import pyarrow.parquet as pq

    from wmss_ray.sweep.trial import SHARED_PHASES

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

    from wmss_ray.stages.evaluate import read_per_sample
    from wmss_ray.stages.stats import paired_test_per_sample

    cfg, grid = asha_sweep
    root = Path(cfg.run_dir()) / "tune"
    control = read_manifest(str(root / "sft_continued"))  # one SFT-continued for all trials, equal compute
    assert control.status == "completed" and control.counts["steps"] == 2
    control_rows = read_per_sample(root / "sft_continued" / "validation" / "eval_SFT-continued.jsonl")
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
    from wmss_ray.sweep.driver import summarize

    cfg, _ = asha_sweep
    lines = summarize(cfg).splitlines()
    assert lines[0].startswith("trials on the validation split, by validation_loss (min)")
    assert sum(" completed " in f" {line} " for line in lines) >= 1 and any("stopped" in line for line in lines)
    assert lines[-2].startswith("held-out test (") and "best trial trial_" in lines[-2]
    assert lines[-1].strip().startswith("WMSS seed 0:") and "McNemar p" in lines[-1]


def test_best_yaml_is_a_complete_config_of_the_best_completed_trial(asha_sweep):
    cfg, grid = asha_sweep
    best = load_config(Path(cfg.run_dir()) / "tune" / "best.yaml")
    done = [r for r in grid if r.metrics.get("final")]
    top = min(done, key=lambda r: r.metrics["validation_loss"])
    assert best.mix.lam == top.config["mix.lam"] and best.curriculum.formula == top.config["curriculum.formula"]
    assert best.run.name == f"{cfg.run.name}-best" and best.run.storage == cfg.run.storage
    assert best.training == cfg.training and best.data == cfg.data  # everything else is the base config


def test_wmss_run_best_yaml_reproduces_the_chosen_trial_and_its_control(asha_sweep):
    import json

    import torch
    from safetensors.torch import load_file

    import wmss_ray.cli.main as cli
    from wmss_ray.sweep.trial import SHARED_PHASES

    cfg, _ = asha_sweep
    root = Path(cfg.run_dir()) / "tune"
    assert cli.main(["run", str(root / "best.yaml")]) == 0
    run = Path(load_config(root / "best.yaml").run_dir())
    assert all((run / p).is_symlink() for p in SHARED_PHASES)  # the sweep's shared phases, not rerun
    final = json.loads((root / "final.json").read_text())

    def weights(model_dir: str) -> dict:
        return {k: v for f in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(f).items()}

    for ours, theirs in ((run / "wmss_1", root / final["trial"] / "wmss_1"), (run / "sft_continued", root / "sft_continued")):
        a, b = (weights(read_manifest(str(d)).outputs["model_dir"]) for d in (ours, theirs))
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ours.name  # bit-identical
    models = json.loads((run / "eval" / "eval_results.json").read_text())["models"]
    assert models["WMSS"]["accuracy"] == final["wmss"][0]["accuracy"]  # the same test set, the same answer
    assert models["SFT-continued"]["accuracy"] == final["sft_continued"]["accuracy"]
    assert (run / "report" / "report.html").exists()


def test_running_the_sweep_again_continues_it_without_rerunning_trials(asha_sweep):
    from wmss_ray.sweep.driver import run_sweep

    cfg, grid = asha_sweep
    root = Path(cfg.run_dir()) / "tune"
    trials = sorted(p for p in root.iterdir() if p.name.startswith("trial_"))
    assert len(trials) == 2

    def traces() -> dict[str, tuple]:  # a rerun would append a train start and rewrite an eval
        return {t.name: ((t / "wmss_1" / "workers.jsonl").read_text(),
                         sorted((e.parent.name, e.stat().st_mtime_ns) for e in t.glob("validation*/eval_results.json")))
                for t in trials}

    def shared() -> tuple:  # the control is not trained again, the test set not read again
        return ((root / "sft_continued" / "workers.jsonl").read_text(),
                (root / "sft_continued" / "validation" / "eval_results.json").stat().st_mtime_ns,
                (root / "final" / "eval_results.json").stat().st_mtime_ns)

    before, before_shared = traces(), shared()
    again = run_sweep(cfg)
    assert sorted(Path(r.path).name for r in again) == sorted(Path(r.path).name for r in grid)
    assert traces() == before  # no trial ran again, finished or stopped
    assert shared() == before_shared
    assert sorted(p for p in root.iterdir() if p.name.startswith("trial_")) == trials


def _completed(grid):
    """The sweep's one completed trial (the other was stopped by ASHA)."""
    done = [r for r in grid if r.metrics.get("final")]
    assert len(done) == 1, [r.metrics for r in grid]
    return done[0]


@pytest.fixture(scope="module")
def two_seed_trial(asha_sweep):
    """A 2-seed trial of the completed sweep trial's configuration (its lam and curriculum
    formula) on the sweep's base run, whose shared phases (up to scoring) serve it too:
    (config, reports, final metrics)."""
    from wmss_ray.sweep.trial import run_trial

    sweep_cfg, grid = asha_sweep
    cfg = load_config("configs/test-tiny.yaml", [f"run.storage={sweep_cfg.run.storage}", *TINY_SWEEP, "tune.seeds=2"])
    reports: list[dict] = []
    final = run_trial(cfg, dict(_completed(grid).config), "seeds_trial", report=reports.append)
    return cfg, reports, final


def test_a_trial_over_two_seeds_reports_their_mean_in_lockstep(two_seed_trial):
    import json

    import pyarrow.parquet as pq

    from wmss_ray.stages.stats import mean_and_spread
    from wmss_ray.sweep.trial import seed_run_dirs

    cfg, reports, final = two_seed_trial
    dirs = [Path(d) for d in seed_run_dirs(str(Path(cfg.run_dir()) / "tune"), "seeds_trial", 2)]  # paths or URIs
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


def test_a_one_seed_trial_is_one_train_run_and_reports_what_the_chunked_seed_reports(asha_sweep, two_seed_trial):
    """tune.seeds 1 (the sweep's completed trial): WMSS validates itself inside one Train run and
    its reports reach Tune from that run; the 2-seed trial's seed 0 (the same configuration, the
    same curriculum draw and data order) trained in chunks, one Train run per report. Same
    training losses, same validation outcomes at every report, one worker-group start."""
    import json

    cfg, grid = asha_sweep
    trial = _completed(grid)
    root = Path(cfg.run_dir()) / "tune"
    one, chunked = root / Path(trial.path).name, root / "seeds_trial"

    def starts(run: Path) -> list[dict]:
        events = [json.loads(x) for x in (run / "wmss_1" / "workers.jsonl").read_text().splitlines()]
        return [e for e in events if e["event"] == "start"]

    assert len(starts(one)) == cfg.scaling.num_workers  # one worker group, from step 0
    assert len(starts(chunked)) == 2 * cfg.scaling.num_workers  # one per chunk
    reports = trial.metrics_dataframe.to_dict("records")  # what Tune received, in order
    assert [(int(r["step"]), bool(r["final"]), int(r["seeds"]), int(r["n_validation"])) for r in reports] == \
        [(1, False, 1, 8), (2, True, 1, cfg.data.demo.n_validation)]

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "wmss_1" / "metrics.jsonl").read_text().splitlines()]

    def outcomes(path: Path) -> tuple[list[tuple], list[float]]:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [(r["sample_id"], r["generated"], r["correct"], r["n_tokens"]) for r in rows], [r["nll"] for r in rows]

    assert losses(one) == pytest.approx(losses(chunked), rel=1e-5)
    for sub in ("validation_step1", "validation"):  # the report after step 1, the final one
        (ours, our_nll), (theirs, their_nll) = (outcomes(t / sub / "eval_WMSS.jsonl") for t in (one, chunked))
        assert ours == theirs and our_nll == pytest.approx(their_nll, rel=1e-5), sub
    step1 = json.loads((one / "validation_step1" / "eval_results.json").read_text())
    assert step1["eval_set"]["name"] == "validation" and step1["models"]["WMSS"]["n"] == 8
    assert reports[0]["validation_loss"] == pytest.approx(step1["models"]["WMSS"]["loss"])
    assert not (one / "wmss_1" / "interim_model").exists()
