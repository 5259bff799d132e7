"""LoRA adapters (``models/lora.py``): targets and bad input, the adapter switch, merge and export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from wmss_ray.config.schema import DemoModelConfig, LoraConfig
from wmss_ray.models.lora import (
    TRAINED,
    WEAK,
    LoraConfigError,
    adapter_scope,
    attach_adapters,
    export_lora,
    read_origin,
    target_module_names,
)
from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
from wmss_ray.models.tokenizer import build_demo_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Qwen3-architecture base model directory and its tokenizer."""
    tok = build_demo_tokenizer()
    model = build_tiny_model(DemoModelConfig(arch="qwen3", **TINY), tok, seed=3)
    return save_pretrained_model(model, tok, tmp_path_factory.mktemp("lora") / "base"), tok


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _ids(tok, n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, len(tok), (2, n), generator=g)


def _perturb(model, adapter: str, seed: int) -> None:
    """Non-zero ``B`` (a fresh adapter is the identity): the tests see the adapter's effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{adapter}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_all_linear_targets_every_attention_and_mlp_linear_but_not_the_head(base):
    path, _ = base
    model = _load(path)
    names = target_module_names(model, "all-linear", path)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 7 * TINY["num_layers"] and "lm_head" not in names
    assert target_module_names(model, ["q_proj", "v_proj"], path) == [n for n in names if n.endswith(("q_proj", "v_proj"))]


def test_a_target_that_matches_nothing_names_the_key_and_the_model_dir(base):
    path, _ = base
    with pytest.raises(LoraConfigError, match=rf"training.lora.target_modules \['qkv'\] matches no linear layer.*{path}"):
        attach_adapters(_load(path), LoraConfig(r=4, target_modules=["qkv"]), path, None, False, False, 0)


def test_a_rank_above_a_layers_width_names_the_key_the_layer_and_the_model_dir(base):
    path, _ = base
    # k_proj: 32 -> 2 kv heads x 8 = 16 outputs
    with pytest.raises(LoraConfigError, match=rf"training.lora.r 17 is larger than layer .*k_proj of the model in {path}"):
        attach_adapters(_load(path), LoraConfig(r=17), path, None, False, False, 0)


def test_an_empty_target_list_fails_at_config_load():
    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.config.schema import ConfigError

    with pytest.raises(ConfigError, match="target_modules"):
        config_from_dict({"training": {"lora": {"r": 8, "target_modules": []}}})
    assert LoraConfig(r=8).lora_alpha == 16.0 and LoraConfig(r=8, alpha=8).lora_alpha == 8.0


def test_the_base_with_the_adapter_switched_off_is_the_base_loaded_alone(base):
    """The shared-base weak forward: same modules, adapters off (or the weak one on) inside the
    scope, bit-identical logits to the base model loaded on its own; the trained adapter after."""
    path, tok = base
    ids = _ids(tok)
    alone = _load(path)(input_ids=ids).logits
    peft_model = attach_adapters(_load(path), LoraConfig(r=4), path, None, True, False, 0)
    _perturb(peft_model, TRAINED, 1)
    _perturb(peft_model, WEAK, 2)
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with_adapter = peft_model(input_ids=ids).logits
    with adapter_scope(peft_model, None):
        off = peft_model(input_ids=ids).logits
    with adapter_scope(peft_model, WEAK):
        weak = peft_model(input_ids=ids).logits
    assert torch.equal(off, alone)
    assert not torch.allclose(with_adapter, alone) and not torch.allclose(weak, with_adapter)
    assert torch.equal(peft_model(input_ids=ids).logits, with_adapter)  # restored
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == grads  # never touched
    trainable = {n for n, g in grads.items() if g}
    assert trainable and all(f".lora_" in n and f".{TRAINED}." in n for n in trainable)


def test_the_merged_export_loads_without_peft_and_equals_the_adapter_on_its_base(base, tmp_path):
    """What the phases export: the merged model (plain transformers) and the adapter (PEFT's
    ``from_pretrained`` on the base) give the same logits; ``wmss_lora.json`` names both."""
    from peft import PeftModel

    path, tok = base
    ids = _ids(tok)
    peft_model = attach_adapters(_load(path), LoraConfig(r=4, alpha=8), path, None, False, False, 0)
    _perturb(peft_model, TRAINED, 1)
    expected = peft_model(input_ids=ids).logits
    out = export_lora(peft_model, tok, str(tmp_path / "model"), peft_model.state_dict(), path)
    merged = _load(out)
    assert type(merged).__name__ == "Qwen3ForCausalLM" and not hasattr(merged, "peft_config")
    on_base = PeftModel.from_pretrained(_load(path), f"{out}/adapter")
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on_base(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
    assert read_origin(out) == (path, f"{out}/adapter")
    assert json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not (tmp_path / "model.merged").exists()
