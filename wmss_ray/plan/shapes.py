"""What ``wmss plan`` knows of a model: :class:`ModelShape`, read from a model directory's
``config.json`` (parameters counted on the meta device: no weights are loaded) or from the demo
model's config."""

from __future__ import annotations

from dataclasses import dataclass

from wmss_ray.config.loading import check_model_dir
from wmss_ray.config.schema import ConfigError, WMSSConfig
from wmss_ray.io import storage


@dataclass(frozen=True)
class ModelShape:
    """What the memory figures need to know about one causal LM."""

    name: str
    params: int
    largest_layer_params: int  # largest parameter count of one module (its own parameters)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qk_norm: bool
    tied: bool = False  # the LM head is the input embedding (tie_word_embeddings)


def shape_from_model(model, name: str) -> ModelShape:
    """:class:`ModelShape` of an ``nn.Module`` causal LM (real or on the meta device)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = cfg.num_attention_heads
    return ModelShape(
        name=name, params=params, largest_layer_params=largest, hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
        qk_norm=any(n.endswith("q_norm") for n, _ in model.named_modules()),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def model_shape(path: str | None, cfg: WMSSConfig, key: str = "models.base") -> ModelShape:
    """Shape of the model in directory ``path`` (its config.json), or of the demo model.

    Raises:
        ConfigError: one line naming ``key`` (the config key that set ``path``) and ``path`` when
            the directory is missing, has no readable config.json or one transformers cannot read.
    """
    import torch

    with torch.device("meta"):  # parameters without storage: any size costs nothing
        if path is None:
            from wmss_ray.models.tiny import build_tiny_model
            from wmss_ray.models.tokenizer import build_demo_tokenizer

            model = build_tiny_model(cfg.models.demo_model, build_demo_tokenizer(), 0)
            return shape_from_model(model, f"demo {cfg.models.demo_model.arch}")
        from transformers import AutoModelForCausalLM

        check_model_dir(path, key)
        try:
            hf = _model_config(path, cfg.models.trust_remote_code)
        except (OSError, ValueError, KeyError) as err:  # an unknown model_type, bad JSON, missing files
            raise ConfigError(f"{key}: transformers cannot read the model config in {storage.redact(path)}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=cfg.models.trust_remote_code)
    return shape_from_model(model, f"{type(model).__name__} ({path})")


def _model_config(path: str, trust_remote_code: bool):
    """The HF config of the model at ``path``, a local directory or a storage URI (of which only
    config.json is read: a plan never copies weights; remote code needs the whole directory)."""
    import os
    import tempfile

    from transformers import AutoConfig

    if not storage.is_remote(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if trust_remote_code:
        return AutoConfig.from_pretrained(storage.local_model_dir(path), trust_remote_code=True, local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="wmss-plan-") as tmp:
        storage.download_dir(path, tmp, keep=lambda rel: rel == "config.json")
        if not os.path.exists(os.path.join(tmp, "config.json")):
            raise FileNotFoundError(f"no config.json in model directory {storage.redact(path)}")
        # explicit False: left None, transformers asks on a TTY (or fails) for a config.json with auto_map
        return AutoConfig.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
