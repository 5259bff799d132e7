"""Run by tests/models/test_vllm_engine.py in a process of its own (vLLM sets its process's threads
and memory policy): builds the vLLM engine and the HF model over the same small random model and
prints one JSON line of what the test checks."""

from __future__ import annotations

import json
import sys


def _model(out_dir: str, head_dim: int) -> str:
    import torch

    from wmss_ray.config.schema import DemoModelConfig
    from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    cfg = DemoModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=64 // head_dim,
                          num_kv_heads=1, max_position_embeddings=128)
    model = build_tiny_model(cfg, tok, seed=0)
    with torch.no_grad():  # large random weights: completions that differ from prompt to prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return save_pretrained_model(model, tok, out_dir)


def main(work: str) -> None:
    from wmss_ray.data.chat_tokens import prompt_ids
    from wmss_ray.models.generate import Sampling, hf_generate_ids
    from wmss_ray.models.loading import load_causal_lm, load_tokenizer
    from wmss_ray.models.vllm_engine import EngineError, VLLMEngine, VLLMSettings

    out: dict = {}
    bad = _model(f"{work}/head16", 16)
    try:
        VLLMEngine(bad, VLLMSettings(cpu_kv_cache_gib=0.25), device="cpu")
        out["bad_model_error"] = None
    except EngineError as err:
        out["bad_model_error"] = str(err)
    good = _model(f"{work}/head32", 32)
    tok = load_tokenizer(good)
    prompts = [prompt_ids(tok, [{"role": "user", "content": f"What is {i} + {3 * i}? Show {i % 7}."}])
               for i in range(24)]
    engine = VLLMEngine(good, VLLMSettings(cpu_kv_cache_gib=0.25), device="cpu")
    greedy = Sampling(max_new_tokens=16)
    out["vllm_greedy"] = [c[0] for c in engine.generate_ids(prompts, greedy)]
    hf = load_causal_lm(good, dtype="float32", device="cpu")
    out["hf_greedy"] = [c[0] for c in hf_generate_ids(hf, tok, prompts, greedy, batch_size=8)]
    sampled = Sampling(max_new_tokens=16, n=3, temperature=1.0, top_p=0.9, seed=5)
    out["sampled_a"] = engine.generate_ids(prompts[:6], sampled)
    out["sampled_b"] = engine.generate_ids(prompts[:6], sampled)
    out["sampled_other_seed"] = engine.generate_ids(prompts[:6], Sampling(max_new_tokens=16, n=3, temperature=1.0,
                                                                          top_p=0.9, seed=6))
    out["stops"] = engine.stops
    out["model_dir"], out["bad_dir"] = good, bad
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
