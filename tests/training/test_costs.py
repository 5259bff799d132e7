"""``training/costs.phase_costs`` on phase directories as the loop writes them, local and on object
storage (a real run's directory: test_rank_loop.py)."""

from __future__ import annotations

import json

import pytest

from wmss_ray.io import storage
from wmss_ray.io.manifest import Manifest
from wmss_ray.training.costs import phase_costs


def _lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_phase_costs_on_object_storage_reads_every_ranks_file(s3_server):
    """On object storage each rank logs to ``workers_rank<r>.jsonl``: the peaks are over all of them
    and all their events (a restarted rank's too)."""
    out = f"s3://{s3_server['bucket']}/costs/wmss_1"
    storage.write_text(storage.join(out, "metrics.jsonl"), _lines(
        {"step": 1, "tokens_seen": 50, "supervised_tokens_seen": 20},
        {"step": 4, "tokens_seen": 210, "supervised_tokens_seen": 80}))
    storage.write_text(storage.join(out, "workers_rank0.jsonl"), _lines(
        {"event": "start", "rank": 0}, {"event": "stop", "rank": 0},
        {"event": "end", "rank": 0, "peak_rss_mb": 900.0, "peak_gpu_mb": 4000.0}))
    storage.write_text(storage.join(out, "workers_rank1.jsonl"), _lines(
        {"event": "end", "rank": 1, "peak_rss_mb": 1200.5, "peak_gpu_mb": 3900.0}))
    storage.write_text(storage.join(out, "model", "workers_rank9.jsonl"), _lines({"peak_rss_mb": 1e9}))  # not a log
    Manifest(phase="wmss_1", status="completed", fingerprint="f", config_hash="h", seconds=33.0).write(out)
    assert phase_costs(out) == {"updates": 4, "supervised_tokens": 80, "tokens": 210, "seconds": 33.0,
                                "peak_rss_mb": 1200.5, "peak_gpu_mb": 4000.0}


def test_what_is_missing_is_none(tmp_path):
    assert phase_costs(str(tmp_path / "never_ran")) == dict.fromkeys(
        ("updates", "supervised_tokens", "tokens", "seconds", "peak_rss_mb", "peak_gpu_mb"))
    # a line from before the counters existed, a CPU run (peak_gpu_mb null), no manifest
    (tmp_path / "metrics.jsonl").write_text(_lines({"step": 3, "loss": 1.0}))
    (tmp_path / "workers.jsonl").write_text(
        _lines({"event": "end", "rank": 0, "peak_rss_mb": 5.0, "peak_gpu_mb": None}))
    assert phase_costs(str(tmp_path)) == {"updates": 3, "supervised_tokens": None, "tokens": None, "seconds": None,
                                          "peak_rss_mb": 5.0, "peak_gpu_mb": None}


def test_a_broken_workers_line_is_named(tmp_path):
    (tmp_path / "workers.jsonl").write_text(_lines({"event": "start"}) + '{"event": "end", "peak_r\n')
    with pytest.raises(ValueError, match=r"workers\.jsonl, line 2: not JSON"):
        phase_costs(str(tmp_path))
