"""Tiny Llama / Qwen3 demo models: config, save/load equality without remote code."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wmss_ray.config.schema import DemoModelConfig
from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
from wmss_ray.models.tokenizer import EOT, IM_END, build_demo_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_build_save_load_equal(arch, tmp_path):
    tok = build_demo_tokenizer()
    model = build_tiny_model(DemoModelConfig(arch=arch, **TINY), tok, seed=3)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert set(model.generation_config.eos_token_id) == {tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT)}
    out = save_pretrained_model(model, tok, tmp_path / arch)
    assert list((tmp_path / arch).glob("*.safetensors")) and not list((tmp_path / arch).glob("*.bin"))
    re = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)  # trust_remote_code off
    assert type(re) is type(model)
    sd, sd2 = model.state_dict(), re.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert re.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    ids = torch.tensor([tok("Compute 1 + 2.", add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(model(ids).logits, re(ids).logits)


def test_seeded_and_independent_of_global_rng():
    tok = build_demo_tokenizer()
    cfg = DemoModelConfig(**TINY)
    a = build_tiny_model(cfg, tok, seed=0)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    b = build_tiny_model(cfg, tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    c = build_tiny_model(cfg, tok, seed=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_bad_head_config_is_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(DemoModelConfig(**{**TINY, "hidden_size": 30}), build_demo_tokenizer(), 0)
