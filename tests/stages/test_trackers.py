"""``stages/trackers.py``: a run directory sent to MLflow (a local file store) and W&B (offline
mode), and read back with MLflow's client and from the offline run file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.stages.wandb_offline import history_and_summary
from wmss_ray.config.loading import config_from_dict
from wmss_ray.io.manifest import Manifest
from wmss_ray.stages import trackers as T


def _phase(run: Path, name: str, seconds: float, outputs=None, status="completed"):
    d = run / name
    d.mkdir(parents=True)
    Manifest(phase=name, status=status, fingerprint="f", config_hash="h", outputs=outputs or {},
             seconds=seconds).write(d)
    return d


@pytest.fixture
def run(tmp_path):
    """A run directory as the pipeline leaves it: two training phases, eval, report, summary."""
    cfg = config_from_dict({"run": {"name": "trk", "storage": str(tmp_path), "trackers": ["mlflow", "wandb"]},
                            "mix": {"lam": 0.4}})
    run = Path(cfg.run_dir())
    for name, losses in (("sft", [3.0, 2.5, 2.0]), ("wmss_1", [2.2, 1.9])):
        d = _phase(run, name, 10.0, {"metrics": str(run / name / "metrics.jsonl")})
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "loss": v, "lr": 0.1, "phase": name, "nontarget_ratio": float("nan")}) + "\n"
            for i, v in enumerate(losses)))
    _phase(run, "eval", 3.0, {"models": {"M1": {"accuracy": 0.5, "loss": 1.5}, "WMSS": {"accuracy": 0.75, "loss": 1.2}}})
    (run / "eval" / "eval_results.json").write_text("{}")
    _phase(run, "sft_continued", 1.0, status="failed")  # not completed: not logged
    (run / "summary.json").write_text("{}")
    return cfg, run


def test_flat_params():
    assert T.flat_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == \
        {"a.b": "1", "a.c.d": "[1, 2]", "e": "None", "f": "{}"}


def test_run_records_read_the_completed_phases(run):
    cfg, path = run
    rec = T.run_records(str(path), ["sft", "wmss_1", "sft_continued", "eval", "report"])
    assert [r["loss"] for r in rec["steps"]["sft"]] == [3.0, 2.5, 2.0] and "sft_continued" not in rec["steps"]
    assert "phase" not in rec["steps"]["sft"][0] and "nontarget_ratio" not in rec["steps"]["sft"][0]
    assert rec["summary"] == {"time/sft_s": 10.0, "time/wmss_1_s": 10.0, "time/eval_s": 3.0,
                              "eval/M1/accuracy": 0.5, "eval/M1/loss": 1.5, "eval/WMSS/accuracy": 0.75,
                              "eval/WMSS/loss": 1.2}
    assert sorted(Path(p).name for p in rec["artifacts"]) == ["eval_results.json", "summary.json"]


def test_mlflow_file_store_and_wandb_offline_read_back(run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    cfg, path = run
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "wmss-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18: the file store needs this opt-in
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    ids = T.log_run(cfg, ["sft", "wmss_1", "sft_continued", "eval"])
    assert set(ids) == {"mlflow", "wandb"}

    client = MlflowClient(tracking_uri=store.as_uri())
    r = client.get_run(ids["mlflow"])
    assert r.info.run_name == "trk" and r.info.status == "FINISHED"
    assert r.data.params["mix.lam"] == "0.4" and r.data.params["run.trackers"] == '["mlflow", "wandb"]'
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "sft/loss")] == \
        [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "wmss_1/loss")] == [2.2, 1.9]
    assert r.data.metrics["eval/WMSS/accuracy"] == 0.75 and r.data.metrics["time/eval_s"] == 3.0
    assert sorted(a.path for a in client.list_artifacts(ids["mlflow"])) == ["eval_results.json", "summary.json"]

    (wandb_file,) = (tmp_path / "wb").glob(f"wandb/offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    # W&B's core process writes the file; under load (the CI's two test processes) its last records
    # landed after finish() returned: read until the run's closing record (its summary) is there.
    deadline = time.monotonic() + 60
    history, summary = history_and_summary(wandb_file)
    while "eval/WMSS/accuracy" not in summary and time.monotonic() < deadline:
        time.sleep(0.5)
        history, summary = history_and_summary(wandb_file)
    assert [(h["sft/step"], h["sft/loss"]) for h in history if "sft/loss" in h] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert [h["wmss_1/loss"] for h in history if "wmss_1/loss" in h] == [2.2, 1.9]
    assert summary["eval/WMSS/accuracy"] == 0.75


def test_a_tracker_that_fails_is_a_warning_not_the_runs_failure(run, monkeypatch, caplog):
    cfg, path = run
    cfg = config_from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "trackers": ["mlflow"]}})

    def boom(*a, **k):
        raise ConnectionError("server down")

    monkeypatch.setattr(T, "log_to_mlflow", boom)
    assert T.log_run(cfg, ["sft"]) == {}
    assert "tracker mlflow: could not log the run (ConnectionError: server down)" in caplog.text
    assert T.log_run(config_from_dict({}), ["sft"]) == {}  # tensorboard only: nothing to send


def test_sweep_callbacks_one_run_per_trial_grouped_under_the_sweep(monkeypatch):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = config_from_dict({"run": {"name": "sw", "trackers": ["tensorboard", "mlflow", "wandb"]}})
    ml, wb = T.tune_callbacks(cfg)
    assert isinstance(ml, MLflowLoggerCallback) and ml.experiment_name == "sw-sweep"
    assert isinstance(wb, WandbLoggerCallback) and wb.group == "sw" and wb.log_config
    assert T.tune_callbacks(config_from_dict({})) == []
