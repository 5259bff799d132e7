"""MetricsWriter on object storage: each record reaches the bucket, a resume truncates later steps."""

from __future__ import annotations

import json

from wmss_ray.io import storage
from wmss_ray.io.files import read_metrics
from wmss_ray.training.metrics import MetricsWriter


def test_metrics_on_s3_are_uploaded_and_truncated_on_resume(s3_server):
    out = f"s3://{s3_server['bucket']}/unit/metrics"
    w = MetricsWriter(out)
    for step in (1, 2, 3):
        w.write({"phase": "sft", "step": step, "loss": 1.0 / step})
        assert [m["step"] for m in read_metrics(storage.join(out, "metrics.jsonl"))] == list(range(1, step + 1))
    w.close()
    assert storage.list_files(storage.join(out, "tb"), "")  # TensorBoard events uploaded at close
    resumed = MetricsWriter(out, start_step=2)  # as after a crash past the step-2 checkpoint
    assert [m["step"] for m in read_metrics(storage.join(out, "metrics.jsonl"))] == [1, 2]
    resumed.write({"phase": "sft", "step": 3, "loss": 0.3})
    resumed.close()
    lines = storage.read_text(storage.join(out, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [1.0, 0.5, 0.3]


def test_the_token_counters_add_up_and_an_older_checkpoint_resumes_them_from_zero():
    from wmss_ray.training.metrics import add_counters, resumed_counters

    counters = {"tokens_seen": 10, "supervised_tokens_seen": 4}
    after = add_counters(counters, {"input_tokens": 7, "n_tokens": 3})
    assert after == {"tokens_seen": 17, "supervised_tokens_seen": 7}
    assert resumed_counters({"step": 2, **counters}) == counters
    # written before the counters existed: counted from the resume step
    assert resumed_counters({"step": 2, "samples_seen": 16}) == {"tokens_seen": 0, "supervised_tokens_seen": 0}
