"""The tiny pipeline with ``run.storage: s3://...`` on a real S3-compatible server (moto, 127.0.0.1).

One run in three invocations, as after interruptions: up to ``sft``; up to ``wmss_1`` with a
training worker SIGKILLed after step 2 (Ray Train restores it from the checkpoint in S3); then
the rest. Checks that completed phases are skipped, every output is in the bucket, the exported
model loads from its URI through the per-node cache, and nothing of the run is on local disk.
Then ``wmss tune`` on that run in the bucket: its trial references the run's phases by URI, its
driver dies after the trial and a second one continues the sweep from the bucket.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path

import pytest

from wmss_ray.config.loading import config_from_dict, load_config
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


# ----------------------------------------------------------------------------- a tune sweep in the bucket

# One trial (a single Tune trial costs a Ray Train start-up, ~15-30 s here), validated in its run
# at step 2 of 3 (an interim export on S3 read back through node_copy), on the s3_run's phases.
S3_SWEEP = ["tune.num_samples=1", "tune.search=random", "tune.scheduler=none", "tune.eval_every=2",
            "tune.eval_samples=4", "tune.max_concurrent=1", 'tune.search_space={"mix.lam": {"uniform": [0.3, 0.7]}}']


class _DriverKilled(Exception):
    pass


@pytest.fixture(scope="module")
def s3_sweep(s3_run, tmp_path_factory):
    """``wmss tune`` on the s3_run's base run: the driver dies once its trial is done (before the
    control, results and page), then a second driver continues the sweep from the bucket."""
    from ray import tune

    from wmss_ray.sweep import driver

    cfg = config_from_dict(s3_run["cfg"].to_dict(), S3_SWEEP, source="the s3 sweep")  # tune.*: no fingerprint
    run_dir = cfg.run_dir()
    shared = {p: _manifest(run_dir, p)["started_at"] for p in driver.SHARED_PHASES}
    cwd = tmp_path_factory.mktemp("sweep-cwd")
    old_cwd, finish = os.getcwd(), driver.finish_sweep

    def killed(*_args, **_kwargs):
        raise _DriverKilled

    os.chdir(cwd)
    try:
        driver.finish_sweep = killed
        with pytest.raises(_DriverKilled):
            driver.run_sweep(cfg)
        driver.finish_sweep = finish
        root = storage.join(run_dir, "tune")
        trial = [n for n in storage.list_entries(root) if n.startswith("trial_")]
        first = {n: _manifest(storage.join(root, n), "wmss_1")["started_at"] for n in trial}
        fs, path = storage.resolve_fs(storage.join(root, driver.EXPERIMENT))
        restorable = tune.Tuner.can_restore(path, storage_filesystem=fs)
        grid = driver.run_sweep(cfg)  # the second driver: Tuner.restore from the bucket
    finally:
        driver.finish_sweep = finish
        os.chdir(old_cwd)
    return {"cfg": cfg, "grid": grid, "root": root, "trials": first, "shared": shared, "cwd": cwd,
            "restorable": restorable}


def test_the_sweep_resumed_from_the_bucket_without_rerunning_its_trial(s3_sweep):
    grid, root = s3_sweep["grid"], s3_sweep["root"]
    assert s3_sweep["restorable"] and root.startswith("s3://")
    assert len(grid) == 1 and grid.errors == []
    (name, started), = s3_sweep["trials"].items()
    assert _manifest(storage.join(root, name), "wmss_1")["started_at"] == started  # trained once
    result = grid[0]
    assert result.metrics["final"] and list(result.metrics_dataframe["step"]) == [2, 3]
    assert result.metrics_dataframe["n_validation"].iloc[0] == 4  # the in-run validation at step 2
    assert storage.exists(storage.join(root, name, "validation_step2", "eval_WMSS.jsonl"))
    assert not storage.exists(storage.join(root, name, "wmss_1", "interim_model"))
    state = storage.list_entries(storage.join(root, "sweep"))
    assert any(n.startswith("experiment_state") for n in state) and "tuner.pkl" in state, state


def test_trials_reference_the_base_phases_by_uri_and_never_rerun_them(s3_sweep):
    from wmss_ray.io.manifest import LINK_SUFFIX, linked_phase
    from wmss_ray.sweep.trial import trial_config

    cfg, root = s3_sweep["cfg"], s3_sweep["root"]
    run_dir = cfg.run_dir()
    (name, _), = s3_sweep["trials"].items()
    trial_dir = storage.join(root, name)
    for phase, started in s3_sweep["shared"].items():
        assert linked_phase(storage.join(trial_dir, phase)) == storage.join(run_dir, phase), phase
        assert storage.exists(storage.join(trial_dir, phase + LINK_SUFFIX))
        assert not storage.exists(storage.join(trial_dir, phase, "manifest.json"))  # no copy
        assert _manifest(run_dir, phase)["started_at"] == started, phase  # the base's: not rerun
    trial_cfg = trial_config(cfg, dict(s3_sweep["grid"][0].config), name)
    with pytest.raises(RuntimeError, match=r"phase tokenize is linked from s3://.*/tiny-s3/tokenize and was forced"):
        run_pipeline(trial_cfg, from_phase="tokenize", until="tokenize")
    assert _manifest(run_dir, "tokenize")["started_at"] == s3_sweep["shared"]["tokenize"]


def test_best_yaml_results_and_the_page_are_in_the_bucket(s3_sweep):
    import yaml

    from wmss_ray.io.manifest import linked_phase

    cfg, root = s3_sweep["cfg"], s3_sweep["root"]
    (name, _), = s3_sweep["trials"].items()
    best = yaml.safe_load(storage.read_text(storage.join(root, "best.yaml")))
    assert best["run"]["name"] == "tiny-s3-best" and best["mix"]["lam"] == s3_sweep["grid"][0].config["mix.lam"]
    best_dir = storage.join(cfg.run.storage, "tiny-s3-best")  # `wmss run best.yaml` reuses the shared phases
    assert linked_phase(storage.join(best_dir, "sft")) == storage.join(cfg.run_dir(), "sft")
    assert name in storage.read_text(storage.join(root, "results.csv"))
    final = json.loads(storage.read_text(storage.join(root, "final.json")))
    assert final["trial"] == name and final["eval_set"]["name"] == "test"
    page = storage.read_text(storage.join(root, "page", "index.html"))
    assert name in page and "tiny-s3" in page and "data:image/png;base64" in page
    assert storage.exists(storage.join(root, "sft_continued", "validation", "eval_SFT-continued.jsonl"))
    assert os.listdir(s3_sweep["cwd"]) == []  # nothing of the sweep on local disk


def test_an_interim_model_on_s3_is_read_fresh_at_every_step(s3_server, tmp_path):
    """The per-node cache keys a model URI by its listing (names, sizes, mtimes), which two
    exports of the same shapes in the same second repeat; ``node_copy`` keys by the step."""
    from wmss_ray.training.validation import node_copy

    cfg = load_config(None, [f"training.staging_dir={tmp_path / 'staging'}"])
    uri = f"s3://{s3_server['bucket']}/unit/interim_model"
    seen, copies = [], []
    for step, weights in ((1, b"AAAA"), (2, b"BBBB")):  # same names and sizes
        storage.write_bytes(storage.join(uri, "model.safetensors"), weights)
        with node_copy(uri, f"step{step}", cfg) as local:
            seen.append(open(os.path.join(local, "model.safetensors"), "rb").read())
            copies.append(local)
    assert seen == [b"AAAA", b"BBBB"]
    assert not any(os.path.exists(c) for c in copies)  # removed after each validation
