"""The tiny pipeline with ``run.storage: s3://...`` on a real S3-compatible server (moto, 127.0.0.1).

One run in three invocations, as after interruptions: up to ``sft``; up to ``wmss_1`` with a
training worker SIGKILLed after step 2 (Ray Train restores it from the checkpoint in S3); then
the rest. Checks that completed phases are skipped, every output is in the bucket, the exported
model loads from its URI through the per-node cache, and nothing of the run is on local disk.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path

import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.io import storage
from wmss_ray.pipeline import build_phases, run_pipeline
from wmss_ray.training.rank_loop import RUN_NAME
from wmss_ray.training.trainer import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
_TEMP_PREFIXES = ("wmss-stage-", "wmss-export-", "wmss-metrics-", "wmss-report-")


def _temp_leftovers() -> set[str]:
    return {p for pre in _TEMP_PREFIXES for p in glob.glob(os.path.join(tempfile.gettempdir(), pre + "*"))}


def _manifest(run_dir: str, phase: str) -> dict:
    return json.loads(storage.read_text(storage.join(run_dir, phase, "manifest.json")))


@pytest.fixture(scope="module")
def s3_run(s3_server, model_cache, ray_cluster, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    before = _temp_leftovers()
    cfg = load_config(REPO / "configs" / "test-tiny.yaml", [
        f"run.storage=s3://{s3_server['bucket']}/runs", "run.name=tiny-s3",
        "training.checkpoint_every=1", "training.max_failures=1",
        "training.max_steps=3",  # the worker killed after step 2 leaves a step to resume
        # no SFT-continued phase: it trains and exports through the same code as wmss_1 (checked
        # here) and would add a Ray Train run and an evaluated model (~15 s) for nothing new
        "evaluation.sft_continued=false",
    ])
    old_cwd = os.getcwd()
    os.chdir(cwd)  # a relative path written by mistake would land here
    try:
        first = run_pipeline(cfg, until="sft")
        started = {p: _manifest(cfg.run_dir(), p)["started_at"] for p in first}
        os.environ[FAULT_ENV] = "0:2"
        try:
            second = run_pipeline(cfg, until="wmss_1")
        finally:
            del os.environ[FAULT_ENV]
        outputs = run_pipeline(cfg)
    finally:
        os.chdir(old_cwd)
    return {"cfg": cfg, "first": first, "second": second, "outputs": outputs, "started": started,
            "cwd": cwd, "new_temp": _temp_leftovers() - before, "cache": model_cache}


def test_every_phase_completed_in_the_bucket_and_none_ran_twice(s3_run):
    cfg, outputs = s3_run["cfg"], s3_run["outputs"]
    run_dir = cfg.run_dir()
    assert run_dir.startswith("s3://")
    names = [p.name for p in build_phases(cfg)]
    assert list(outputs) == names
    assert list(s3_run["first"])[-1] == "sft" and list(s3_run["second"])[-1] == "wmss_1"
    for name in names:
        man = _manifest(run_dir, name)
        assert man["status"] == "completed" and man["outputs"] == outputs[name], name
    for name, started_at in s3_run["started"].items():  # the later invocations skipped them
        assert _manifest(run_dir, name)["started_at"] == started_at, name
    assert storage.exists(storage.join(run_dir, "config.yaml"))


def test_outputs_are_uris_in_the_bucket(s3_run):
    out, run_dir = s3_run["outputs"], s3_run["cfg"].run_dir()
    paths = [out["data"]["train"], out["data"]["validation"], out["phase0"]["model_dir"], out["tokenize"]["tokenized"],
             out["tokenize"]["rejects"], out["score_1"]["scores"], out["curriculum_1"]["sampled_ids"],
             out["curriculum_1"]["weights"],
             out["sft"]["model_dir"], out["wmss_1"]["model_dir"], out["wmss_1"]["metrics"],
             out["eval"]["results"], out["report"]["report"]]
    for p in paths:
        assert p.startswith(run_dir + "/") and storage.exists(p), p
    assert storage.list_files(out["tokenize"]["tokenized"], ".parquet")
    metrics = [json.loads(x) for x in storage.read_text(out["wmss_1"]["metrics"]).splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # one line per step across the restart
    assert storage.list_files(storage.join(run_dir, "wmss_1", "tb"), "")
    saved = json.loads(storage.read_text(out["eval"]["results"]))
    results = saved["models"]
    assert set(results) >= {"M1", "WMSS"} and all(r["per_sample_path"].startswith("s3://") for r in results.values())
    assert saved["checker"] == out["eval"]["checker"] and saved["eval_set"]["name"] == "test"
    assert saved["eval_set"]["source"] == out["data"]["eval"]
    html = storage.read_text(out["report"]["report"])
    assert "WMSS run report" in html and run_dir in html and "No training metrics" not in html
    assert "No curriculum weights" not in html and "Effective sample size" in html
    data = json.loads(storage.read_text(storage.join(run_dir, "report", "report_data.json")))
    assert data["weights"] == out["curriculum_1"]["weights"] and data["scores"] == out["score_1"]["scores"]
    assert data["phases"]["wmss"] == out["wmss_1"]["metrics"] and data["weight_histogram"]["draws"] > 0


def test_the_killed_worker_resumed_from_the_checkpoint_in_s3(s3_run):
    run_dir = s3_run["cfg"].run_dir()
    wmss = storage.join(run_dir, "wmss_1")
    assert storage.exists(storage.join(wmss, ".fault_injected"))
    starts = [json.loads(x)["start_step"] for x in storage.read_text(storage.join(wmss, "workers_rank0.jsonl")).splitlines()
              if json.loads(x)["event"] == "start"]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] in (1, 2)  # restored, not restarted
    ckpts = [p for p in storage.list_files(storage.join(wmss, RUN_NAME), "") if "/checkpoint_" in p]
    assert ckpts, "no Ray Train checkpoint in the bucket"


def test_the_exported_model_loads_from_its_uri_through_the_cache(s3_run):
    from wmss_ray.models.loading import load_causal_lm

    uri = s3_run["outputs"]["wmss_1"]["model_dir"]
    model = load_causal_lm(uri)
    local = storage.local_model_dir(uri)
    assert local.startswith(s3_run["cache"]) and os.path.exists(os.path.join(local, ".wmss_complete"))
    assert model.config.vocab_size > 0


def test_nothing_of_the_run_is_on_local_disk(s3_run):
    assert os.listdir(s3_run["cwd"]) == []  # no runs/ or "s3:" folder in the working directory
    assert s3_run["new_temp"] == set()  # staging, export and metrics temp dirs were removed
    cached = os.listdir(s3_run["cache"])
    assert cached and all(not n.startswith(".") for n in cached)  # complete copies only


def test_an_unreachable_store_fails_at_start_naming_the_uri(s3_server, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there
    cfg = load_config(REPO / "configs" / "test-tiny.yaml", ["run.storage=s3://closed/runs", "run.name=r"])
    with pytest.raises(storage.StorageError, match=r"run storage s3://closed/runs/r is not reachable"):
        run_pipeline(cfg)
