"""Tiny Llama / Qwen3 causal LMs created from config for the demo world.

The models are ordinary ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` instances, so everything
downstream (scoring, DeepSpeed training, export, ``AutoModelForCausalLM.from_pretrained``)
treats them exactly like real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from wmss_ray.config.schema import DemoModelConfig
from wmss_ray.models.tokenizer import EOT


def special_token_ids(tokenizer) -> dict[str, int | list[int] | None]:
    """pad / bos / eos ids for a model config, and the generation stop ids.

    ``eos_token_id`` is the tokenizer's eos (``<|im_end|>`` for the demo tokenizer); the
    generation stops also include ``<|endoftext|>`` when the vocabulary has it, the document
    separator of pre-training. ``bos`` is ``<|endoftext|>`` as in Qwen configs (never prepended
    by the tokenizer).
    """
    vocab = tokenizer.get_vocab()
    eot = vocab.get(EOT)
    stops = [tokenizer.eos_token_id] + ([eot] if eot is not None and eot != tokenizer.eos_token_id else [])
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eot,
        "eos_token_id": tokenizer.eos_token_id,
        "generation_eos_token_id": stops,
    }


def build_tiny_model(cfg: DemoModelConfig, tokenizer, seed: int, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A freshly initialised tiny causal LM (fp32) with ``vocab_size = len(tokenizer)``.

    ``attn_implementation``: a name resolved by ``models.loading.resolve_attn_implementation``
    (the demo builds and pre-trains on the CPU: sdpa).

    Weights are drawn from a seeded torch generator scope, so the same (cfg, tokenizer, seed)
    always gives the same weights without touching the caller's global RNG state.
    """
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"demo_model.hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"demo_model.num_heads {cfg.num_heads} is not divisible by num_kv_heads {cfg.num_kv_heads}")
    ids = special_token_ids(tokenizer)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        attn_implementation=attn_implementation,
    )
    if cfg.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif cfg.arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config, cls = Qwen3Config(**common), Qwen3ForCausalLM
    else:  # pragma: no cover - the config schema restricts arch
        raise ValueError(f"unknown demo_model.arch {cfg.arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["generation_eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        do_sample=False,
    )
    return model


def save_pretrained_model(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> str:
    """Save model (safetensors) + config + generation_config + tokenizer into ``out_dir``.

    Returns ``out_dir`` as a string; the directory loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors (the safe_serialization flag is gone).
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if not any(out.glob("*.safetensors")):  # pragma: no cover - guards a future default change
        raise RuntimeError(f"save_pretrained wrote no .safetensors file into {out}")
    return str(out)
