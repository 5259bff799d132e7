"""``stages/timings.py``: per phase wall time, throughput, resources and the WMSS/SFT step-time
ratio, read back from manifests and metrics (no clock is read here)."""

from __future__ import annotations

import json

import pytest

from wmss_ray.config.loading import config_from_dict
from wmss_ray.io.manifest import Manifest
from wmss_ray.stages import timings as T


def _man(tmp_path, name, seconds, counts=None, outputs=None, status="completed"):
    d = tmp_path / name
    d.mkdir()
    Manifest(phase=name, status=status, fingerprint="f", config_hash="h", counts=counts or {},
             outputs=outputs or {}, started_at=0.0, finished_at=seconds, seconds=seconds).write(d)
    return d


def _metrics(d, tps):
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "tokens_per_s": t}) + "\n"
                                             for i, t in enumerate(tps)))


def test_kinds_and_resources_from_the_config():
    cfg = config_from_dict({"scaling": {"num_workers": 2, "cpus_per_worker": 1.5},
                            "scoring": {"num_actors": 3, "cpus_per_actor": 2},
                            "mix": {"placement": "pool", "mode": "frozen",
                                    "pool": {"replicas": 2, "shards": 1, "gpus_per_actor": 0.5}}}).to_dict()
    assert [T.phase_kind(n) for n in ("sft", "wmss_2", "sft_continued", "score_1", "curriculum_3", "eval")] == \
        ["train", "train", "train", "score", "curriculum", "eval"]
    assert T.phase_resources("sft", cfg) == {"CPU": 3.0, "GPU": 0.0}
    assert T.phase_resources("wmss_1", cfg) == {"CPU": 5.0, "GPU": 1.0}  # + the pool's 2 actors
    assert T.phase_resources("score_1", cfg) == {"CPU": 6.0, "GPU": 0.0}
    assert T.phase_resources("report", cfg) == {"CPU": 1.0, "GPU": 0.0}


def test_step_time_ratio_is_seconds_per_token_medians_without_the_warmup_step():
    sft = [{"tokens_per_s": 1.0}] + [{"tokens_per_s": 100.0}] * 3  # first step: warm-up, left out
    wmss = [{"tokens_per_s": 5.0}, {"tokens_per_s": 50.0}, {"tokens_per_s": 50.0}, {"tokens_per_s": float("nan")}]
    assert T.step_time_ratio(wmss, sft) == pytest.approx(2.0)
    assert T.step_time_ratio([], sft) is None and T.step_time_ratio(wmss, []) is None
    assert T.seconds_per_token([{"tokens_per_s": 4.0}]) == 0.25  # a single step is kept


def test_collect_timings_summary_table_and_html(tmp_path):
    cfg = config_from_dict({}).to_dict()
    _man(tmp_path, "tokenize", 2.0, {"rows_in": 100, "rows_rejected": 3})
    _metrics(_man(tmp_path, "sft", 10.0, {"steps": 5, "loss": 1.25}), [10, 100, 100])
    _man(tmp_path, "score_1", 4.0, {"rows_scored": 97})
    _metrics(_man(tmp_path, "wmss_1", 8.0, {"steps": 4, "loss": 0.5}), [10, 40, 40])
    _metrics(_man(tmp_path, "sft_continued", 6.0, {"steps": 4, "loss": 0.7}), [10, 80, 80])
    _man(tmp_path, "eval", 3.0, outputs={"models": {"M1": {"n": 16}, "WMSS": {"n": 16}}})
    t = T.collect_timings(str(tmp_path), ["tokenize", "sft", "score_1", "wmss_1", "sft_continued", "eval", "nope"], cfg)
    rows = {r["phase"]: r for r in t["phases"]}
    assert rows["tokenize"]["per_s"] == 50.0 and rows["tokenize"]["rejected"] == 3
    assert rows["score_1"]["per_s"] == pytest.approx(97 / 4)
    assert rows["sft"]["per_s"] == 0.5 and rows["sft"]["tokens_per_s"] == pytest.approx(100.0)
    assert rows["eval"]["rows"] == 32 and rows["nope"]["status"] == "missing"
    assert t["total_seconds"] == 33.0
    assert t["wmss_sft_step_ratio"] == pytest.approx(2.0) and t["ratio_against"] == "sft_continued"
    table = T.format_timings_table(t)
    assert "WMSS/SFT step time: 2.00x" in table and "loss 0.5000" in table and "3 rejected" in table
    assert "0.5 steps/s, 100 tok/s" in table and "50 rows/s" in table
    assert table.splitlines()[0].split() == ["phase", "status", "seconds", "throughput", "resources"]
    html = T.timings_html(t)
    assert "<td>score_1</td>" in html and "24.2 rows/s" in html and "2.00x" in html
    assert "No phase timings" in T.timings_html(None)
    path = T.write_summary(str(tmp_path), t, {"M1": {"accuracy": 0.5}})
    assert T.read_summary(str(tmp_path)) == json.loads(open(path).read())
    assert T.read_summary(str(tmp_path / "none")) is None
