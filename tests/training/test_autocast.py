"""``training.autocast`` on the real step code without Ray: fp32 weights under bf16 autocast
against a plain autocast loop, and a checkpoint round trip (the DeepSpeed config and the config
refusals: test_dataset.py; ``wmss plan``'s lines: tests/test_plan_memory.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.test_training_units import (  # noqa: F401  (artifacts: the shared fixture)
    _round_trip,
    _run_worker,
    artifacts,
    reference_run,
    tiny_cfg,
)
from wmss_ray.config.loading import config_from_dict


def _autocast_cfg(**training):
    t = tiny_cfg(**training).training.model_dump() | {"autocast": True}
    return config_from_dict({"training": t, "mix": {"lam": 0.5}, "models": {"dtype": "bfloat16"}})


@pytest.mark.parametrize("stage, mode", [(0, "joint"), (2, "frozen"), (3, "joint")])
def test_autocast_trains_fp32_weights_as_a_plain_autocast_loop_does(artifacts, tmp_path, stage, mode):
    """``training.autocast`` (models.dtype bf16): fp32 weights and optimizer with no master copy
    (stage 0: the client AdamW itself), the forward under bf16 autocast, a frozen weak model kept
    in bf16 below stage 3; its losses and gradient norms follow a plain autocast loop, and its
    weights the loop's, within bf16 rounding of the logits."""
    cfg = _autocast_cfg(zero_stage=stage, max_steps=3)
    worker, metrics = _run_worker(artifacts, cfg, "wmss", mode, 3, tmp_path)
    ref = reference_run(artifacts, cfg, "wmss", mode, 3, autocast=True)
    assert worker.engine.torch_autocast_enabled() and not worker.engine.bfloat16_enabled()
    assert worker.engine.get_data_types() == (torch.float32, torch.float32)
    if stage == 0:
        assert isinstance(worker.engine.optimizer, torch.optim.AdamW)  # no BF16_Optimizer master copies
    assert {p.dtype for p in worker.pair.strong.parameters()} == {torch.float32}
    weak_dtype = torch.bfloat16 if mode == "frozen" and stage < 3 else torch.float32
    assert {p.dtype for p in worker.pair.weak.parameters()} == {weak_dtype}
    got = [m["loss"] for m in metrics]
    assert np.allclose(got, ref["losses"], rtol=2e-3), (got, ref["losses"])
    norms = [m["grad_norm"] for m in metrics]
    assert np.allclose(norms, ref["grad_norms"], rtol=2e-2), (norms, ref["grad_norms"])
    # Weights: the updates. Adam's update is ~lr * sign(grad) where a gradient is ~0, so bf16
    # rounding flips single entries by up to 2 lr per step; whole tensors' updates must agree (here
    # within 9 %; a missed step, a wrong lr or bf16 weights is off by 50-100 %).
    from wmss_ray.models.loading import load_causal_lm

    init, ours, theirs = load_causal_lm(artifacts["strong"], dtype="float32").state_dict(), \
        worker.strong_state_dict(), ref["strong"].state_dict()
    for key, w0 in init.items():
        d_ours, d_ref = ours[key].float() - w0, theirs[key].float() - w0
        rel = float((d_ours - d_ref).norm() / d_ref.norm().clamp_min(1e-12))
        assert rel < 0.2, (key, rel)
    assert got[-1] < got[0]


def test_an_autocast_checkpoint_continues_exactly(artifacts, tmp_path):
    """Stage 0 under autocast (the client AdamW's own state over fp32 weights): a fresh worker
    loading the step-1 checkpoint takes the same step 2 as the worker that never stopped."""
    cfg = _autocast_cfg(zero_stage=0, max_steps=2)
    second = _round_trip(artifacts, cfg, "joint", tmp_path)
    assert {p.dtype for p in second.pair.parameters()} == {torch.float32}


def test_an_engine_after_an_autocast_engine_reduces_in_fp32_again(artifacts, tmp_path):
    """DeepSpeed keeps "autocast is on" in module globals: a bf16-weight ZeRO-2 engine built after
    an autocast one in the same process (the GPU check's step matrix, a test session) reduced its
    gradients in bf16 instead of its configured fp32 until ``ds_config`` reset them."""
    _run_worker(artifacts, _autocast_cfg(zero_stage=2, max_steps=1), "sft", "sft", 0, tmp_path / "a")
    cfg = config_from_dict({"training": tiny_cfg(zero_stage=2, max_steps=1).training.model_dump(),
                            "models": {"dtype": "bfloat16"}})
    worker, _ = _run_worker(artifacts, cfg, "sft", "sft", 0, tmp_path / "b")
    opt = worker.engine.optimizer
    assert {opt.get_param_comm_dtype(p) for p in worker.pair.parameters()} == {torch.float32}
