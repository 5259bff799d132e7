"""Validation inside a training run (``training/validation.py``) on 2 gloo ranks: each rank
generates for its share of the evaluator's batches, rank 0 gathers them, and the outcome is the
in-process evaluation's, row for row, with the same files."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from tests.stages.test_evaluation import _cfg, _eval_rows, forced_model  # noqa: F401  (a fixture)
from wmss_ray.models.vllm_engine import vllm_installed
from wmss_ray.stages.evaluate import evaluate_models, load_eval_rows, read_per_sample
from wmss_ray.training.validation import ValidationPoints, write_rows


def _rank(rank: int, world: int, port: int, points: ValidationPoints, model_dir: str, out: str,
          evaluation: dict) -> None:
    import torch.distributed as dist

    from wmss_ray.training.validation import validate_on_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = validate_on_ranks(_cfg(**evaluation), points, model_dir, 3, rank, world, "cpu")
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_ranks_validate_like_the_in_process_evaluation(forced_model, tmp_path, engine):  # noqa: F811
    """HF on the ranks, or vLLM in a child process of each rank: the in-process HF evaluation's outcome."""
    if engine == "vllm" and not vllm_installed() and os.environ.get("CI") != "true":
        pytest.skip("vLLM is not installed (make install adds it)")
    rows = load_eval_rows(_eval_rows(), _cfg())  # 7 rows, batch_size 3: batches 0, 2 on rank 0, 1 on rank 1
    points = ValidationPoints(every=3, rows_path=str(tmp_path / "rows.jsonl"), out_root=str(tmp_path / "trial"))
    write_rows(rows, points.rows_path)
    assert points.due(3, 10) and not points.due(4, 10) and not points.due(9, 9)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    evaluation = {"engine": engine, "vllm": {"cpu_kv_cache_gib": 0.25}}
    mp.spawn(_rank, args=(2, port, points, forced_model, str(tmp_path), evaluation), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1]  # every rank reports the same metrics
    ref = evaluate_models({"WMSS": forced_model}, rows, _cfg(), tmp_path / "ref", eval_set="validation")["WMSS"]
    assert got[0]["n_validation"] == ref.n == 7 and got[0]["step"] == 3
    assert got[0]["validation_accuracy"] == ref.accuracy and got[0]["validation_loss"] == pytest.approx(ref.loss)
    step_dir = tmp_path / "trial" / "validation_step3"
    ours, theirs = read_per_sample(step_dir / "eval_WMSS.jsonl"), ref.per_sample
    assert [(r["sample_id"], r["generated"], r["correct"]) for r in ours] == \
        [(r["sample_id"], r["generated"], r["correct"]) for r in theirs]
    assert [r["nll"] for r in ours] == pytest.approx([r["nll"] for r in theirs], rel=1e-5)
    summary = json.loads((step_dir / "eval_results.json").read_text())
    assert summary["eval_set"]["name"] == "validation" and summary["models"]["WMSS"]["n"] == 7
    assert summary["models"]["WMSS"]["engine"] == engine


# ----------------------------------------------------------------------------- the validation-selected peak
# (the whole of it in a run, on 2 forked ranks: test_rank_loop.py)


def _point(step: int, acc: float) -> dict:
    return {"step": step, "validation_accuracy": acc, "validation_loss": 1.0 - acc, "n_validation": 10}


def test_the_rule_higher_accuracy_wins_and_a_tie_goes_to_the_earlier_step():
    from wmss_ray.training.validation import better

    assert better(_point(1, 0.0), None)  # the first point is the peak
    assert better(_point(4, 0.6), _point(2, 0.5)) and not better(_point(4, 0.4), _point(2, 0.5))
    assert not better(_point(3, 0.5), _point(2, 0.5))  # a tie: the earlier step keeps it
    assert better(_point(1, 0.5), _point(2, 0.5))  # (a restart validating an earlier step again)
    assert not better(_point(2, 0.5), _point(2, 0.5))  # the same step again never moves the peak


def test_a_bad_peak_json_is_named_with_its_field(tmp_path):
    from wmss_ray.training.validation import read_peak

    assert read_peak(str(tmp_path)) is None
    (tmp_path / "peak.json").write_text('{"step": 2, "validation_accuracy": 0.5}')
    with pytest.raises(ValueError, match=r"peak\.json: field 'validation_loss' is missing"):
        read_peak(str(tmp_path))
    (tmp_path / "peak.json").write_text('{"step": 2,')
    with pytest.raises(ValueError, match=r"peak\.json: not JSON"):
        read_peak(str(tmp_path))
