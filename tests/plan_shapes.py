"""Qwen3-4B's shape for the ``wmss plan`` tests (tests/test_plan.py, tests/test_plan_memory.py):
its config.json and the ``ModelShape`` the plan reads from it (no weights needed)."""

from __future__ import annotations

from wmss_ray.plan import ModelShape

QWEN3_4B = {  # Qwen3-4B's config.json shape (no weights needed)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
}
S4B = ModelShape("qwen3-4b", 4_022_468_096, 388_956_160, 2560, 36, 32, 8, 128, 9728, 151936, True, tied=True)
