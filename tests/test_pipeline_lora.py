"""End to end with LoRA: ``wmss run configs/test-tiny.yaml --set training.lora.r=8`` (in process,
on the session's Ray) runs every phase, and what it exports serves without PEFT.

Each training phase exports the merged model (``<phase>/model``: plain safetensors, loaded by
``AutoModelForCausalLM`` with no adapter code) and its adapter (``<phase>/model/adapter``, PEFT
format); WMSS iteration 1 continued the SFT adapter on M0, so the merged WMSS model equals M0 plus
its adapter loaded with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wmss_ray.config.loading import load_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_the_tiny_pipeline_with_lora_runs_every_phase_and_exports_plain_models(ray_cluster, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from wmss_ray.pipeline import build_phases, run_pipeline

    cfg = load_config(REPO / "configs" / "test-tiny.yaml", ["training.lora.r=8", f"run.storage={tmp_path}"])
    out = run_pipeline(cfg)
    assert list(out) == [p.name for p in build_phases(cfg)] and "wmss_1" in out and "sft_continued" in out
    run = Path(cfg.run_dir())
    for phase in out:
        assert json.loads((run / phase / "manifest.json").read_text())["status"] == "completed", phase
    m0 = out["phase0"]["model_dir"]
    for phase in ("sft", "wmss_1", "sft_continued"):
        model_dir = Path(out[phase]["model_dir"])
        origin = json.loads((model_dir / "wmss_lora.json").read_text())
        assert origin == {"base": m0, "adapter": "adapter"}  # every adapter sits on M0
        assert json.loads((model_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    merged_dir = out["wmss_1"]["model_dir"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)  # plain transformers
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m0, dtype=torch.float32),
                                        f"{merged_dir}/adapter")
    ids = torch.arange(5, 25).reshape(2, 10)
    torch.testing.assert_close(merged(input_ids=ids).logits, on_base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(m0, dtype=torch.float32)
    assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)  # the adapters trained
    evaluated = json.loads(Path(out["eval"]["results"]).read_text())
    assert evaluated and out["report"]["report"]
