"""``phases._train_outputs``: what a training phase puts in its manifest."""

from __future__ import annotations

from wmss_ray.phases import _train_outputs
from wmss_ray.training.trainer import TrainResult


def test_the_peak_is_an_output_only_of_a_run_that_keeps_one():
    res = TrainResult(model_dir="/r/wmss_1/model", metrics_path="/r/wmss_1/metrics.jsonl", steps=6,
                      final_metrics={"step": 6, "loss": 1.0})
    plain = _train_outputs(res)
    assert plain == {"outputs": {"model_dir": "/r/wmss_1/model", "metrics": "/r/wmss_1/metrics.jsonl", "steps": 6},
                     "counts": {"steps": 6, "step": 6, "loss": 1.0}}  # as before the peak existed
    res.peak = {"step": 2, "validation_accuracy": 0.5, "model_dir": "/r/wmss_1/peak_model"}
    assert _train_outputs(res) == {**plain, "outputs": {**plain["outputs"], "peak": res.peak}}
