"""A phase stopped at one world size and ZeRO stage resumes at another (``training/resize.py``).

On 2 forked gloo ranks (``forked_ranks``, the rank loop Ray Train's workers run): a WMSS run at
``W=2, grad_accum=2, ZeRO-2`` stops after step 2 and resumes at ``W=1, grad_accum=4`` (the same
global batch of 8 rows) and, from a copy of the same checkpoint, at ``W=2, ZeRO-3``: through a
DeepSpeed universal checkpoint each. Every step after the resume must have the loss and gradient
norm of an uninterrupted ``W=2, ZeRO-2`` run, and the last checkpoint must show steps ``[0, 2)``
and ``[2, 6)`` trained (none lost, none repeated).

Tolerance, and why: the rows of a step are the same whatever the world size (``DataPlan``: step
``s`` is stream positions ``[s G, (s + 1) G)``) and the loss is the global-token mean, so only the
order of float32 sums differs (4 micro-batches accumulated on one rank instead of 2 on each of 2
ranks and an all-reduce; ZeRO-3's per-parameter partitions instead of ZeRO-2's flat ones):
~1e-7 relative per step, which Adam may amplify where a gradient is ~0. Measured: at most 1e-7
absolute on losses of ~4.6 over these 4 steps. ``rtol=1e-5`` is 100x that and still ~100x below
what a wrong optimizer state does (the Adam step of a ZeRO-3 sub-group advanced twice per step,
a bug DeepSpeed 0.19.8's universal load has and ``resize`` repairs: 2.7e-6 at the first step
after the resume, 1.7e-3 by the third).

Joint mode, so that both models train with different learning rates (``weak_lr``): DeepSpeed's
ZeRO-3 universal load copies group 0's hyperparameters to every group. Frozen mode (the weak
model left out of the checkpoint) in bf16 resumes at ``W=1, ZeRO-3`` (both changes at once;
measured equal to the uninterrupted bf16 run to the last bit on CPU). ZeRO-0 (unpartitioned)
resumes at ``W=1`` with no conversion. Joint under ``training.autocast`` (fp32 weights, bf16
compute) resumes at ``W=1, ZeRO-3``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.training.forked_ranks import train_on_forked_ranks
from tests.training.test_training_units import TWO_WORKER_STEPS as STEPS, make_artifacts, tiny_cfg
from wmss_ray.config.loading import config_from_dict
from wmss_ray.io.files import read_metrics
from wmss_ray.training.resize import LayoutChangeError, needs_universal

STOP = 2
RTOL = 1e-5


def _cfg(stage: int, workers: int, grad_accum: int, dtype: str = "float32", **kw):
    """The 2-worker test run's plan (1.5 epochs capped at 6 steps, a checkpoint every 2) at
    ``workers`` x ``grad_accum`` x micro-batch 2 rows per step, models in ``dtype`` ("autocast":
    fp32 weights under bf16 autocast, ``training.autocast``)."""
    cfg = tiny_cfg(zero_stage=stage, sft_epochs=1.5, wmss_epochs=1.5, max_steps=STEPS, checkpoint_every=2,
                   num_workers=workers, grad_accum=grad_accum, **kw)
    precision = ["models.dtype=bfloat16", "training.autocast=true"] if dtype == "autocast" else [f"models.dtype={dtype}"]
    return config_from_dict(cfg.to_dict(), precision)


def _train(art: dict, cfg, out: Path, mode: str, **kw):
    return train_on_forked_ranks(cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"], str(out),
                                 mode=mode, fingerprint="resize-test", **kw)


def _last_state(out: Path) -> dict:
    last = sorted((out / "ray_train").glob("checkpoint_*"))[-1]
    return json.loads((last / "trainer_state.json").read_text())


def _metrics(out: Path) -> list[dict]:
    return read_metrics(str(out / "metrics.jsonl"))


def _assert_resumed_like(out: Path, reference: list[dict]) -> None:
    got = _metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # steps 1-2 before the stop, 3-6 after
    for key in ("loss", "grad_norm"):
        a, b = [m[key] for m in got[STOP:]], [m[key] for m in reference[STOP:]]
        assert np.allclose(a, b, rtol=RTOL, atol=0), (key, a, b)
    state = _last_state(out)
    assert state["step"] == STEPS and state["segments"] == [[0, STOP], [STOP, STEPS]]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("resize_art"))


@pytest.fixture(scope="module")
def runs(art, tmp_path_factory):
    """``runs(mode, stage, dtype)``: ``(uninterrupted run's metrics, run stopped after step 2)``
    at ``W=2 x grad_accum 2``, each made once per module."""
    made: dict = {}

    def get(mode: str, stage: int, dtype: str) -> tuple[list[dict], Path]:
        if (mode, stage, dtype) not in made:
            root = tmp_path_factory.mktemp(f"{mode}_z{stage}_{dtype}")
            kw = {"weak_lr": 1e-3} if mode == "joint" else {}
            assert _train(art, _cfg(stage, 2, 2, dtype, **kw), root / "uninterrupted", mode).steps == STEPS
            _train(art, _cfg(stage, 2, 2, dtype, **kw), root / "stopped", mode, stop_after=STOP)
            made[mode, stage, dtype] = _metrics(root / "uninterrupted"), root / "stopped"
        return made[mode, stage, dtype]

    return get


@pytest.mark.parametrize("mode, stage, dtype, resumes_at", [
    ("joint", 2, "float32", [(2, 1, 4), (3, 2, 2)]),  # (zero stage, workers, grad_accum): another W; another stage
    # both at once, in bf16 (fp32 master weights and Adam state), the weak model left out of the checkpoint
    ("frozen", 2, "bfloat16", [(3, 1, 4)]),
    ("frozen", 0, "float32", [(0, 1, 4)]),  # ZeRO 0: nothing partitioned, loaded as it is (no conversion)
    # fp32 weights under autocast: both models' fp32 shards converted, resumed at W=1, ZeRO-3
    ("joint", 2, "autocast", [(3, 1, 4)]),
])
def test_a_stopped_phase_resumes_at_another_world_size_and_zero_stage(art, runs, tmp_path, mode, stage, dtype,
                                                                      resumes_at):
    kw = {"weak_lr": 1e-3} if mode == "joint" else {}
    ref, stopped = runs(mode, stage, dtype)
    assert _last_state(stopped)["layout"] == {"world_size": 2, "zero_stage": stage, "micro_batch_size": 2,
                                              "grad_accum": 2, "placement": "colocated"}
    for new_stage, workers, accum in resumes_at:
        out = tmp_path / f"z{new_stage}_w{workers}"
        shutil.copytree(stopped, out)
        result = _train(art, _cfg(new_stage, workers, accum, dtype, **kw), out, mode, resume=True)
        assert result.model_dir is not None
        _assert_resumed_like(out, ref)
        assert _last_state(out)["layout"]["world_size"] == workers


def test_another_global_batch_or_a_zero0_to_zero2_resume_fails_before_any_rank_starts(art, runs, tmp_path):
    """``W=2 x grad_accum 2`` -> ``W=1 x grad_accum 2``: 4 rows a step instead of 8 is another run
    (another number of steps, other batches): refused naming the global batch. ZeRO 0 -> 2 cannot
    be converted: refused naming both stages. Nothing trained either time (``train_phase`` checks
    the same before Ray Train starts a worker, ``check_resumable``)."""
    out = tmp_path / "run"
    shutil.copytree(runs("frozen", 0, "float32")[1], out)
    with pytest.raises(ValueError, match=r"global_batch=8.*global_batch=4"):  # before any rank starts
        _train(art, _cfg(0, 1, 2), out, "frozen", resume=True)
    with pytest.raises(LayoutChangeError, match=r"zero_stage 0 and this run has 2"):
        _train(art, _cfg(2, 1, 4), out, "frozen", resume=True)
    assert _last_state(out)["step"] == STOP


@pytest.mark.parametrize("saved, world, stage, converts", [
    ({"world_size": 2, "zero_stage": 2}, 2, 2, False),  # the same partitions
    ({"world_size": 2, "zero_stage": 2}, 1, 2, True),
    ({"world_size": 2, "zero_stage": 1}, 2, 3, True),
    ({"world_size": 2, "zero_stage": 0}, 4, 0, False),  # ZeRO 0 is unpartitioned: any world size as it is
])
def test_conversion_only_when_the_zero_partitions_differ(saved, world, stage, converts):
    assert needs_universal(saved, world, stage, "ckpt") is converts


@pytest.mark.parametrize("saved, world, stage, message", [
    ({"world_size": 2, "zero_stage": 0}, 2, 2, r"ckpt was written at training.zero_stage 0 and this run has 2"),
    ({"world_size": 2, "zero_stage": 3}, 1, 0, r"zero_stage 3 and this run has 0.*stages 1-3 only"),
    ({"world_size": 2, "zero_stage": None}, 1, 2, r"older wmss-ray.*resumes only at its world size 2"),
])
def test_a_layout_change_that_cannot_be_honoured_fails_at_once(saved, world, stage, message):
    with pytest.raises(LayoutChangeError, match=message):
        needs_universal(saved, world, stage, "ckpt")


def test_a_failed_conversion_fails_loudly_and_leaves_no_scratch(tmp_path, monkeypatch):
    """A checkpoint DeepSpeed cannot convert raises naming it (here: no ZeRO shards at all), and a
    conversion that fails half-way leaves the node's staging directory as it was."""
    from wmss_ray.training import checkpointing
    from wmss_ray.training.checkpointing import load_checkpoint

    ckpt = tmp_path / "checkpoint_000002"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "fingerprint": "f", "plan": {}, "layout": {"world_size": 2, "zero_stage": 2}}))
    staging = tmp_path / "staging"

    def load():
        load_checkpoint(None, str(ckpt), 0, exclude_frozen=False, fingerprint="f",
                        layout={"world_size": 1, "zero_stage": 2}, staging=str(staging))

    with pytest.raises(LayoutChangeError, match=f"converting {ckpt} to a universal checkpoint failed"):
        load()

    def half_way(ckpt_dir, tag, out_dir):  # fragments written, then the disk fills up
        Path(out_dir, tag, "tmp").mkdir(parents=True)
        Path(out_dir, tag, "tmp", "fragment").write_bytes(b"x")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointing, "to_universal", half_way)
    with pytest.raises(OSError, match="No space left"):
        load()
    assert list(staging.iterdir()) == []
