"""LoRA adapters (PEFT) on a frozen base: attach, switch, merge, export, and where a model came from.

The adapter being trained is PEFT's ``"default"`` (saved at the top of its directory, as
``PeftModel.from_pretrained`` expects); a second adapter ``"weak"`` on the same base serves the
weak model of an iteration whose weak model is the base plus an earlier adapter. Which adapter a
forward runs is switched by :func:`adapter_scope` without touching ``requires_grad`` (PEFT's own
``set_adapter`` / ``disable_adapter`` flip it, which would change what the optimizer trains).

A phase trained with LoRA exports ``<dir>/`` (the merged model: plain safetensors for
``AutoModelForCausalLM``), ``<dir>/adapter/`` (the adapter, PEFT format) and ``<dir>/wmss_lora.json``
(``{"base": <base model dir>, "adapter": "adapter"}``): :func:`read_origin` tells a later phase that
this model is that base plus that adapter, so that it can share the base with the weak model.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from wmss_ray.io import storage

TRAINED = "default"  # the adapter a phase trains (PEFT's default name)
WEAK = "weak"  # the weak model's adapter on the shared base
ORIGIN_FILE = "wmss_lora.json"
ADAPTER_SUBDIR = "adapter"


class LoraConfigError(ValueError):
    """``training.lora`` does not fit the model; the message names the key and the model directory."""


# ----------------------------------------------------------------------------- targets


def target_module_names(model: nn.Module, target: str | list[str], model_dir: str) -> list[str]:
    """Full names of the ``nn.Linear`` modules ``training.lora.target_modules`` selects.

    ``"all-linear"``: every linear layer except the output embedding (the LM head), whatever the
    architecture. A list: modules whose name equals an entry or ends with ``"." + entry``.

    Raises:
        LoraConfigError: nothing matched (naming the key, the entries and the model directory).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if target == "all-linear":
        names = [n for n, _ in linear]
    else:
        names = [n for n, _ in linear if any(n == t or n.endswith("." + t) for t in target)]
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linear})
        raise LoraConfigError(f"training.lora.target_modules {target!r} matches no linear layer of the model in "
                              f"{model_dir} (its linear layers end in: {leaves})")
    return names


def check_rank(model: nn.Module, names: list[str], r: int, model_dir: str) -> None:
    """Raise :class:`LoraConfigError` when ``r`` exceeds a targeted layer's smaller side (the
    update ``B [out, r] @ A [r, in]`` would then have more parameters than a full-rank one)."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        width = min(m.in_features, m.out_features)
        if r > width:
            raise LoraConfigError(f"training.lora.r {r} is larger than layer {name} of the model in {model_dir} "
                                  f"({m.in_features} -> {m.out_features}: at most r = {width})")


def _compact_targets(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest target list PEFT matches to exactly ``names``: their last name parts when
    those select the same modules (a readable ``adapter_config.json``), else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    same = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaves}
    return leaves if same == set(names) else sorted(names)


# ----------------------------------------------------------------------------- attach


def attach_adapters(model: nn.Module, lora, model_dir: str, trained: str | None, weak: str | None | bool,
                    weak_trainable: bool, seed: int):
    """Wrap ``model`` (an HF causal LM, maybe ZeRO-3-partitioned) in a ``PeftModel``.

    Args:
        lora: ``cfg.training.lora`` (``r > 0``).
        model_dir: the base model's directory (for error messages and the adapter's config).
        trained: an adapter directory the ``"default"`` adapter starts from; None: a fresh one
            (``B = 0``: the model's function is the base's at step 0).
        weak: an adapter directory for the ``"weak"`` adapter, True for a fresh one (joint mode
            on the base), False/None for none.
        weak_trainable: the weak adapter is trained (joint) or frozen (its dropout removed).
        seed: the fresh adapters' ``A`` init is drawn from this seed on every rank (ZeRO stages
            and resumed runs start from the same weights).

    Only adapter weights are trainable afterwards; the adapters are created before
    ``deepspeed.initialize``, which turns them into ZeRO-3 parameters (broadcast from rank 0).
    """
    from peft import LoraConfig, PeftConfig, get_peft_model

    names = target_module_names(model, lora.target_modules, model_dir)
    check_rank(model, names, lora.r, model_dir)
    fresh = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout, bias="none",
                       target_modules=_compact_targets(model, names), task_type="CAUSAL_LM")

    def config_of(adapter_dir: str | None):
        if adapter_dir is None:
            return fresh
        saved = PeftConfig.from_pretrained(storage.local_model_dir(adapter_dir))
        saved.inference_mode = False  # PEFT saves adapters as inference-only; which train is set below
        return saved

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config_of(trained), adapter_name=TRAINED, autocast_adapter_dtype=False)
        if weak:
            weak_dir = weak if isinstance(weak, str) else None
            peft_model.add_adapter(WEAK, config_of(weak_dir), autocast_adapter_dtype=False)
    for name, adapter_dir in ((TRAINED, trained), (WEAK, weak if isinstance(weak, str) else None)):
        if adapter_dir is not None:
            _load_adapter_weights(peft_model, adapter_dir, name)
    # what trains: PEFT marks only the active adapter; set it per adapter, once, here
    for pname, p in peft_model.named_parameters():
        p.requires_grad_(f".{TRAINED}." in pname or (weak_trainable and f".{WEAK}." in pname))
    if weak and not weak_trainable:  # a frozen weak model runs without dropout
        for m in _lora_layers(peft_model):
            if WEAK in m.lora_dropout:
                m.lora_dropout[WEAK] = nn.Identity()
    peft_model.peft_config[TRAINED].base_model_name_or_path = str(model_dir)
    return peft_model


def _load_adapter_weights(peft_model, adapter_dir: str, name: str) -> None:
    """Copy a saved adapter's tensors into adapter ``name`` (plain tensors: before ZeRO-3 wraps
    them); every tensor of that adapter must be in the file and nothing else."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(storage.local_model_dir(adapter_dir), "adapter_model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter_model.safetensors in adapter directory {adapter_dir}")
    result = set_peft_model_state_dict(peft_model, load_file(path), adapter_name=name)
    own = {k for k, _ in peft_model.named_parameters() if f".{name}." in k}
    missing = sorted(own & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {adapter_dir} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapter_scope(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run ``model``'s LoRA layers with ``adapter`` alone (None: no adapter, the bare base) inside
    the block, then restore. Only which adapter runs changes: ``requires_grad`` is never touched."""
    layers = _lora_layers(model)
    state = [(m._active_adapter if adapter is None else [adapter], adapter is None) for m in layers]
    with _restored(layers, state):
        yield


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The parameters of adapter ``adapter`` (the optimizer's group for it)."""
    return [p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]


class AdapterParams:
    """One adapter's parameters where ``ds_config.param_groups`` expects a module."""

    def __init__(self, model: nn.Module, adapter: str):
        self.model, self.adapter = model, adapter

    def parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.model, self.adapter)


# ----------------------------------------------------------------------------- merge and export


_PEFT_PREFIX = "base_model.model."


def scalings(model: nn.Module, adapter: str = TRAINED) -> dict[str, float]:
    """``{PEFT module name: alpha / r}`` of every layer carrying ``adapter``."""
    from peft.tuners.lora import LoraLayer

    return {n: m.scaling[adapter] for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.scaling}


def merged_state_dict(state: dict[str, torch.Tensor], scale: dict[str, float],
                      adapter: str = TRAINED) -> dict[str, torch.Tensor]:
    """The plain HF state dict of ``base + adapter`` from a ``PeftModel`` state dict.

    ``W [out, in] + scale * B [out, r] @ A [r, in]`` per adapted layer, in fp32, cast back to the
    base weight's dtype; every other adapter dropped; keys without PEFT's wrappers.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        plain = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        mod = key.removesuffix(".base_layer.weight")
        if mod != key and mod in scale:
            a = state[f"{mod}.lora_A.{adapter}.weight"].float()
            b = state[f"{mod}.lora_B.{adapter}.weight"].float()
            value = (value.float() + scale[mod] * (b @ a)).to(value.dtype)
        out[plain] = value
    return out


def export_lora(peft_model, tokenizer, out_dir: str, state: dict[str, torch.Tensor], base_dir: str) -> str:
    """Write the merged model to ``out_dir`` (plain HF, safetensors), the trained adapter to
    ``out_dir/adapter`` and ``out_dir/wmss_lora.json``; ``state``: the full ``PeftModel`` state
    dict (gathered on this rank). Written to ``<out_dir>.tmp`` and renamed, as ``export_model``."""
    import shutil

    from wmss_ray.models.loading import export_model

    merged = merged_state_dict(state, scalings(peft_model))
    export_model(peft_model.get_base_model(), tokenizer, f"{out_dir}.merged", state_dict=merged)
    tmp = f"{out_dir}.merged"
    adapter_sd = {k: v for k, v in state.items() if f".{TRAINED}." in k and ".lora_" in k}
    peft_model.peft_config[TRAINED].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(os.path.join(tmp, ADAPTER_SUBDIR), state_dict=adapter_sd,
                               selected_adapters=[TRAINED], save_embedding_layers=False)
    with open(os.path.join(tmp, ORIGIN_FILE), "w") as f:
        json.dump({"base": str(base_dir), "adapter": ADAPTER_SUBDIR}, f)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def read_origin(model_dir: str) -> tuple[str, str] | None:
    """``(base dir, adapter dir)`` of a model a LoRA phase exported, else None."""
    path = storage.join(model_dir, ORIGIN_FILE)
    if not storage.exists(path):
        return None
    origin: dict[str, Any] = json.loads(storage.read_text(path))
    return origin["base"], storage.join(model_dir, origin["adapter"])


def same_dir(a: str, b: str) -> bool:
    """Two model directory names for the same directory (absolute paths or URIs compared)."""
    return storage.location(a) == storage.location(b)


def recompute_context(model: nn.Module):
    """A ``torch.utils.checkpoint`` ``context_fn`` for ``model`` (an HF model that is or will be
    LoRA-wrapped in place): the recomputation of a checkpointed layer in backward runs with the
    adapter that layer's forward ran with. Without it the weak forward of a trained weak adapter
    on the shared base (joint mode) would be recomputed with the strong adapter active (backward
    runs after :func:`adapter_scope` has restored it)."""
    from contextlib import nullcontext

    cache: list[nn.Module] = []

    def context_fn():
        if not cache:
            cache.extend(_lora_layers(model))
        state = [(m._active_adapter, m._disable_adapters) for m in cache]
        return nullcontext(), _restored(cache, state)

    return context_fn


@contextmanager
def _restored(layers: list[nn.Module], state: list[tuple[Any, bool]]) -> Iterator[None]:
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m, (active, disabled) in zip(layers, state):
            m._active_adapter, m._disable_adapters = active, disabled
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled
