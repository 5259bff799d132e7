"""The validation-selected peak's files (``training/validation.keep_peak``, ``resume_peak``) on a
local directory and on object storage (the S3 test server; this file is in the object-store
xdist group)."""

from __future__ import annotations

from tests.training.test_validation import _point


def _keep_peak_story(out: str) -> None:
    """Rank 0's side (no process group: one rank): a better point's interim export becomes
    ``peak_model`` (a worse one changes nothing), a winning final model is named as it is and the
    copy goes; a run that starts again at step 0 forgets an earlier attempt's peak, a resumed one
    reads it."""
    from wmss_ray.io import storage
    from wmss_ray.training.validation import PEAK_RULE, keep_peak, read_peak, resume_peak

    interim, final, copy = (storage.join(out, name) for name in ("interim_model", "model", "peak_model"))
    storage.write_text(storage.join(interim, "w.safetensors"), "step 2")
    peak = keep_peak(_point(2, 0.5), None, out, interim, 0, final=False)
    assert peak == {**_point(2, 0.5), "model_dir": copy, "rule": PEAK_RULE} == read_peak(out)
    storage.write_text(storage.join(interim, "w.safetensors"), "step 3")
    assert keep_peak(_point(3, 0.5), peak, out, interim, 0, final=False) == peak  # a tie: no copy
    assert storage.read_text(storage.join(copy, "w.safetensors")) == "step 2"
    assert resume_peak(out, 3, 0) == peak  # a restart at step 3 continues from it
    storage.write_text(storage.join(final, "w.safetensors"), "step 6")
    peak = keep_peak(_point(6, 0.7), peak, out, final, 0, final=True)
    assert peak["model_dir"] == final and read_peak(out) == peak and not storage.exists(copy)
    assert resume_peak(out, 0, 0) is None and read_peak(out) is None  # a fresh start: none


def test_keep_peak_copies_a_better_point_and_the_final_model_replaces_it(tmp_path):
    _keep_peak_story(str(tmp_path))


def test_keep_peak_on_object_storage(s3_server):
    _keep_peak_story(f"s3://{s3_server['bucket']}/peak")
