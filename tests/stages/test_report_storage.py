"""The report of a run dir on object storage (``wmss_ray.stages.report_storage``): the mirror takes only
what the report reads, and ``report_data.json`` names the run's URIs, not the temp mirror."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wmss_ray.io import storage
from wmss_ray.stages.report_storage import is_report_input, rebase, write_report_at


def test_only_the_files_the_report_reads_are_mirrored():
    for rel in ("config.yaml", "eval/eval_results.json", "eval/eval_WMSS.jsonl", "wmss_1/metrics.jsonl",
                "score_1/scores.parquet", "curriculum_1/weights.parquet", "sft/manifest.json"):
        assert is_report_input(rel), rel
    for rel in ("wmss_1/model/model.safetensors", "tokenize/tokenized/part-000000.parquet",
                "curriculum_1/sampled_ids.parquet", "wmss_1/wmss_1/checkpoint_000001/ds/x.pt", "data/train.jsonl"):
        assert not is_report_input(rel), rel


def test_rebase_moves_paths_under_a_prefix_both_ways():
    value = {"phases": {"wmss": "s3://b/r/wmss_1/metrics.jsonl", "sft_continued": None},
             "scores": "s3://b/r/score_1/scores.parquet", "list": ["s3://b/r/x", "s3://b/rother/y"], "n": 3}
    local = rebase(value, "s3://b/r/", "/tmp/m")
    assert local == {"phases": {"wmss": "/tmp/m/wmss_1/metrics.jsonl", "sft_continued": None},
                     "scores": "/tmp/m/score_1/scores.parquet", "list": ["/tmp/m/x", "s3://b/rother/y"], "n": 3}
    assert rebase(local, "/tmp/m", "s3://b/r") == value


def _weights_table(n: int) -> pa.Table:
    w = np.random.default_rng(0).random(n)
    return pa.table({"sample_id": [f"s{i}" for i in range(n)], "weight": w / w.sum(),
                     "draws": np.arange(n, dtype=np.int64) % 3})


def test_a_report_on_s3_reads_the_mirror_and_records_uris(s3_server, tmp_path):
    run = f"s3://{s3_server['bucket']}/unit/report-run"
    storage.reset_dir(run)
    weights = storage.join(run, "curriculum_1", "weights.parquet")
    local_w = tmp_path / "weights.parquet"
    pq.write_table(_weights_table(20), local_w)
    storage.upload_file(str(local_w), weights)
    metrics = storage.join(run, "wmss_1", "metrics.jsonl")
    storage.write_text(metrics, "".join(json.dumps({"phase": "wmss", "step": s, "loss": 1.0 / s,
                                                    "p_mix": 0.5, "p_strong": 0.4}) + "\n" for s in (1, 2, 3)))
    results = {"models": {"WMSS": {"accuracy": 0.5, "loss": 1.0, "n": 4}}, "phases": {"wmss": metrics},
               "weights": weights, "eval_dir": storage.join(run, "eval"), "run_dir": run}
    path = write_report_at(run, results, storage.join(run, "report"))
    assert path == storage.join(run, "report", "report.html")
    html = storage.read_text(path)
    assert run in html and "No curriculum weights" not in html and "No training metrics" not in html
    data = json.loads(storage.read_text(storage.join(run, "report", "report_data.json")))
    assert data["weights"] == weights and data["phases"]["wmss"] == metrics
    assert data["weight_histogram"]["draws"] == int(_weights_table(20)["draws"].to_numpy().sum())
