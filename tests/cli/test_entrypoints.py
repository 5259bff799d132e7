"""The jobs/ entrypoints without a cluster: argument parsing, config loading, wiring to the API."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from wmss_ray.cli import jobs as common

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "test-tiny.yaml"
NAMES = ("pipeline", "score", "train", "eval", "tune")


@pytest.mark.parametrize("name", NAMES)
def test_build_parser_parses_config_and_overrides(name):
    mod = importlib.import_module(f"jobs.{name}")
    ns = mod.build_parser().parse_args(["--config", "configs/x.yaml", "--set", "mix.lam=0.4", "--set", "run.seed=3"])
    assert ns.config == "configs/x.yaml" and ns.overrides == ["mix.lam=0.4", "run.seed=3"] and ns.address == "auto"
    with pytest.raises(SystemExit):
        mod.build_parser().parse_args([])  # --config is required


def test_pipeline_parser_has_from_phase():
    from jobs import pipeline

    assert pipeline.build_parser().parse_args(["--config", "c.yaml", "--from-phase", "eval"]).from_phase == "eval"


def test_check_cluster_parser():
    from jobs import check_cluster

    ns = check_cluster.build_parser().parse_args(["--out", "o.json", "--storage", "/mnt/wmss", "--tasks", "2"])
    assert (ns.out, ns.storage, ns.tasks, ns.address) == ("o.json", "/mnt/wmss", 2, "auto")


def test_help_needs_neither_ray_nor_the_api():
    code = (
        "import sys\n"
        "import jobs.pipeline, jobs.score, jobs.train, jobs.eval, jobs.check_cluster\n"
        "for m in (jobs.pipeline, jobs.score, jobs.train, jobs.eval, jobs.check_cluster):\n"
        "    m.build_parser().format_help()\n"
        "print(sorted(k for k in sys.modules if k == 'ray' or k.startswith('wmss_ray')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the thin jobs/ files and the argument parsing they share: no Ray, no config, no pipeline
    assert out.stdout.strip() == str(["wmss_ray", "wmss_ray.cli", "wmss_ray.cli.check_cluster", "wmss_ray.cli.jobs"])


def test_load_job_config_from_path_and_inline(monkeypatch):
    from_file = common.load_job_config(str(TINY), ["mix.lam=0.3"])
    monkeypatch.setenv("WMSS_TEST_CFG", TINY.read_text())
    inline = common.load_job_config("env:WMSS_TEST_CFG", ["mix.lam=0.3"])
    assert from_file.mix.lam == 0.3 and inline.config_hash() == from_file.config_hash()


def test_load_job_config_errors_are_setup_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("WMSS_MISSING", raising=False)
    with pytest.raises(common.JobSetupError, match="WMSS_MISSING is not set"):
        common.load_job_config("env:WMSS_MISSING", [])
    with pytest.raises(common.JobSetupError, match="not found"):
        common.load_job_config(str(tmp_path / "nope.yaml"), [])
    with pytest.raises(common.JobSetupError, match="mix.lam"):
        common.load_job_config(str(TINY), ["mix.lam=7"])


def test_connect_without_a_cluster_says_so(monkeypatch):
    import ray

    def no_cluster(**kwargs):
        assert kwargs["address"] == "auto"  # never asks Ray to start a cluster
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(common.JobSetupError, match="no running Ray cluster reachable"):
        common.connect()


def test_a_refused_token_says_how_to_pass_one(monkeypatch):
    import ray

    from wmss_ray.cluster import TOKEN_HELP

    class AuthenticationError(Exception):  # what Ray raises, matched by name
        pass

    def refused(**kwargs):
        raise AuthenticationError("401")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(common.JobSetupError) as err:
        common.connect()
    assert "auth token is missing or wrong" in str(err.value) and TOKEN_HELP in str(err.value)


def test_main_returns_2_on_setup_errors(tmp_path, capsys):
    from jobs import pipeline, score

    assert pipeline.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert score.main(["--config", str(TINY), "--set", "mix.nope=1"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ("pipeline", "score", "train", "eval"))
def test_main_calls_the_api_after_connecting(name, monkeypatch, capfd, tmp_path):
    pipeline_api = pytest.importorskip("wmss_ray.pipeline")
    calls: list[tuple] = []
    monkeypatch.setattr(common, "connect", lambda address="auto": calls.append(("connect", address)))

    def run_pipeline(cfg, from_phase=None):
        calls.append(("run_pipeline", cfg.mix.lam, from_phase))
        return {"ok": 1}

    def run_phase(cfg, phase):
        calls.append(("run_phase", cfg.mix.lam, phase))
        return {"ok": 1}

    monkeypatch.setattr(pipeline_api, "run_pipeline", run_pipeline)
    monkeypatch.setattr(pipeline_api, "run_phase", run_phase)
    mod = importlib.import_module(f"jobs.{name}")
    argv = ["--config", str(TINY), "--set", "mix.lam=0.25", "--set", f"run.storage={tmp_path}"]
    argv += ["--from-phase", "eval"] if name == "pipeline" else []
    assert mod.main(argv) == 0
    expected = ("run_pipeline", 0.25, "eval") if name == "pipeline" else ("run_phase", 0.25, name)
    assert calls == [("connect", "auto"), expected]
    # the console is the process's original stdout (fd 1); the libraries' output went to <run>/logs/
    assert 'wmss-job-result: {"ok": 1}' in capfd.readouterr().out
    assert len(list((tmp_path / "test-tiny" / "logs").glob("driver-*.log"))) == 1


def test_tune_main_runs_the_sweep_after_connecting(monkeypatch, capfd, tmp_path):
    sweep = pytest.importorskip("wmss_ray.sweep.driver")
    from jobs import tune as tune_job
    from wmss_ray.sweep.results import trial_rows, write_outputs

    calls: list[tuple] = []
    monkeypatch.setattr(common, "connect", lambda address="auto": calls.append(("connect", address)))

    class Trial:
        def __init__(self, lam, acc, final):
            self.config, self.error, self.path = {"mix.lam": lam}, None, f"/r/tune/trial_{lam}"
            self.metrics = {"validation_accuracy": acc, "final": final}

    # the stopped trial's (subsample) accuracy is higher, but only completed trials are chosen
    grid = [Trial(0.3, 0.5, True), Trial(0.6, 0.9, False), Trial(0.4, 0.2, True)]
    from pathlib import Path

    def run_sweep(cfg):  # what the sweep leaves behind: results.csv (no control, no final.json)
        calls.append(("run_sweep", cfg.mix.lam))
        write_outputs(cfg, trial_rows(grid), [], Path(cfg.run_dir()).resolve() / "tune")
        return grid

    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    assert tune_job.main(["--config", str(TINY), "--set", "mix.lam=0.25", "--set", f"run.storage={tmp_path}"]) == 0
    assert calls == [("connect", "auto"), ("run_sweep", 0.25)]
    out = capfd.readouterr().out
    assert '"best_config": {"mix.lam": 0.3}' in out and '"heldout_test": null' in out
    assert "held-out test: not evaluated" in out  # the table, then the final line
