"""Models: the demo tokenizer and tiny models, safe HF loading, the weak/strong pair, export.

- ``models.tokenizer``: ``build_demo_tokenizer`` (char-level, chat template, eos = ``<|im_end|>``).
- ``models.tiny``: ``build_tiny_model`` (Llama / Qwen3 from ``DemoModelConfig``),
  ``save_pretrained_model``.
- ``models.loading``: ``load_causal_lm``, ``load_tokenizer``, ``resolve_dtype``,
  ``check_pair_compatible`` / ``IncompatibleModelsError``, ``export_model``, ``output_head``.
- ``models.generate``: ``greedy_generate`` (left-padded batched greedy decoding).

Submodules are imported on first use so ``import wmss_ray.models`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_demo_tokenizer": "tokenizer",
    "build_tiny_model": "tiny",
    "save_pretrained_model": "tiny",
    "load_causal_lm": "loading",
    "load_tokenizer": "loading",
    "resolve_dtype": "loading",
    "check_pair_compatible": "loading",
    "IncompatibleModelsError": "loading",
    "export_model": "loading",
    "output_head": "loading",
    "greedy_generate": "generate",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
