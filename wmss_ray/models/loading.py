"""Safe loading of HF causal LMs and tokenizers, the weak/strong pair check, strong export.

Local directories or storage URIs copied to a per-node cache first (no hub on these machines), safetensors only, remote code
off unless the caller passes ``trust_remote_code=True`` (``cfg.models.trust_remote_code``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoTokenizer

from wmss_ray.io import storage
from wmss_ray.io.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Model classes (``transformers.modeling_utils``, ~1.8 CPU-s of imports) are imported inside the
# functions that build or unwrap a model: a tokenising actor imports this module for
# ``load_tokenizer`` only, and every actor start would pay for them.

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class IncompatibleModelsError(ValueError):
    """Weak and strong models cannot be mixed (their token ids do not mean the same thing)."""


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere; "float32" / "bfloat16" / "float16" as named."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_attn_implementation(name: str, device: str | torch.device) -> str:
    """``models.attn_implementation`` for models that compute on ``device``.

    "auto" -> "flash_attention_2" on CUDA when the ``flash_attn`` package imports, else "sdpa".
    An explicit "flash_attention_2" without CUDA or without ``flash_attn`` raises at once
    (never a silent fallback to another kernel).
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"models.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    on_gpu = torch.device(device).type == "cuda"
    if name in ("sdpa", "eager"):
        return name
    try:
        import flash_attn  # noqa: F401

        have_flash = True
    except ImportError:
        have_flash = False
    if name == "auto":
        return "flash_attention_2" if on_gpu and have_flash else "sdpa"
    if not on_gpu:
        raise ValueError(f"models.attn_implementation 'flash_attention_2' needs a CUDA device, got {device}")
    if not have_flash:
        raise ImportError("models.attn_implementation 'flash_attention_2' needs the flash-attn package "
                          "(pip install flash-attn; the GPU image installs it), which is not importable")
    return name


class ModelDirError(UserError, FileNotFoundError):
    """A model or tokenizer directory is missing or holds no usable weights (the user's to fix)."""


def _local_dir(path: str | Path, what: str) -> Path:
    """The local HF directory for ``path``; a storage URI is copied to this node's cache first."""
    p = Path(storage.local_model_dir(str(path)))
    if not p.is_dir():
        raise ModelDirError(f"{what} directory not found: {path} (expected a local HF directory)")
    return p


def has_safetensors(path: str | Path) -> bool:
    """True when ``path`` holds safetensors weights (single file or sharded index)."""
    p = Path(path)
    return any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json"))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """``AutoTokenizer`` from a local directory (no network, no remote code by default)."""
    local = _local_dir(path, "tokenizer")
    return AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code, local_files_only=True)


def load_causal_lm(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
    *,
    zero3_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM from a local HF directory, safetensors weights only, moved to ``device``.

    ``attn_implementation``: "auto" is resolved for ``device``; a model loaded on the CPU for a
    GPU run gets the name :func:`resolve_attn_implementation` gave for the GPU.

    ``zero3_config``: a DeepSpeed config dict with ZeRO stage 3 (needs an initialised
    ``torch.distributed`` group): the model is built under ``deepspeed.zero.Init`` and its
    weights scattered into the partitions (:func:`wmss_ray.models.zero3_loading.load_zero3`);
    ``device`` is then not used (the partitions live where DeepSpeed puts them).

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist or has no safetensors weights
            (e.g. only ``pytorch_model.bin``, which is never unpickled here).
    """
    p = _local_dir(path, "model")
    if not has_safetensors(p):
        found = sorted(f.name for f in p.iterdir())[:8]
        raise ModelDirError(
            f"no safetensors weights in model directory {path} (found: {found}); "
            "convert the checkpoint to safetensors first"
        )
    dtype = resolve_dtype(dtype, device)
    attn = (resolve_attn_implementation(attn_implementation, device)
            if attn_implementation == "auto" else attn_implementation)
    if zero3_config is not None:
        from wmss_ray.models.zero3_loading import load_zero3

        return load_zero3(p, dtype, trust_remote_code, zero3_config, attn)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(p),
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        attn_implementation=attn,
    )
    return model.to(device)


def _vocab_size(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def vocab_hash(tokenizer) -> str:
    """sha256 of the token -> id mapping (added tokens included)."""
    blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _special_ids(tokenizer) -> dict[str, Any]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "unk_token_id": tokenizer.unk_token_id,
        "special_tokens": sorted(tokenizer.all_special_tokens),
    }


def pair_differences(weak_config, weak_tok, strong_config, strong_tok) -> list[str]:
    """What differs between two (config, tokenizer) pairs in ways that break logit mixing.

    Returns human-readable lines; an empty list means compatible. Also flags a tokenizer with
    more tokens than its own model's embedding rows.
    """
    diffs = []
    wv, sv = _vocab_size(weak_config), _vocab_size(strong_config)
    if wv != sv:
        diffs.append(f"config vocab_size: weak {wv} != strong {sv}")
    if len(weak_tok) != len(strong_tok):
        diffs.append(f"len(tokenizer): weak {len(weak_tok)} != strong {len(strong_tok)}")
    for name, cfg_v, tok in (("weak", wv, weak_tok), ("strong", sv, strong_tok)):
        if cfg_v is not None and len(tok) > cfg_v:
            diffs.append(f"{name} tokenizer has {len(tok)} tokens but its model only {cfg_v} embedding rows")
    wh, sh = vocab_hash(weak_tok), vocab_hash(strong_tok)
    if wh != sh and len(weak_tok) == len(strong_tok):
        diffs.append(f"tokenizer vocabulary content differs (hash weak {wh} != strong {sh})")
    ws, ss = _special_ids(weak_tok), _special_ids(strong_tok)
    for key in ws:
        if ws[key] != ss[key]:
            diffs.append(f"{key}: weak {ws[key]!r} != strong {ss[key]!r}")
    return diffs


def check_pair_compatible(
    weak_path: str | Path, strong_path: str | Path, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Fail fast unless weak and strong share vocabulary size, vocabulary and special tokens.

    Returns ``{"vocab_size", "len_tokenizer", "vocab_hash"}`` of the (shared) vocabulary.

    Raises:
        IncompatibleModelsError: naming both paths and every difference found.
        FileNotFoundError: when a directory does not exist.
    """
    loaded = []
    for path in (weak_path, strong_path):
        local = _local_dir(path, "model")
        cfg = AutoConfig.from_pretrained(str(local), trust_remote_code=trust_remote_code, local_files_only=True)
        loaded.append((cfg, load_tokenizer(path, trust_remote_code)))
    diffs = pair_differences(loaded[0][0], loaded[0][1], loaded[1][0], loaded[1][1])
    if diffs:
        raise IncompatibleModelsError(
            f"weak model {weak_path} and strong model {strong_path} cannot be mixed "
            f"(WMSS needs one shared tokenizer and vocabulary):\n  - " + "\n  - ".join(diffs)
        )
    cfg, tok = loaded[1]
    return {"vocab_size": _vocab_size(cfg), "len_tokenizer": len(tok), "vocab_hash": vocab_hash(tok)}


def unwrap_model(model):
    """The HF model inside a DeepSpeed engine / DDP wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    while hasattr(model, "module") and not isinstance(model, PreTrainedModel):
        model = model.module
    return model


def export_model(model, tokenizer, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write a plain HF directory (config, generation_config, safetensors, tokenizer).

    ``state_dict`` overrides the model's own tensors (e.g. a ZeRO-3 consolidated state dict
    gathered on rank 0). Written to ``<out_dir>.tmp`` and renamed, so ``out_dir`` is either
    complete or absent. Returns ``out_dir``.
    """
    model = unwrap_model(model)
    out, tmp = Path(out_dir), Path(f"{out_dir}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    if not has_safetensors(tmp):  # pragma: no cover - transformers 5 always writes safetensors
        raise RuntimeError(f"export wrote no safetensors weights into {tmp}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)


def output_head(model) -> tuple[torch.nn.Module, torch.Tensor]:
    """``(decoder, head_weight)``: the base transformer and the LM head weight ``[V, D]``.

    ``decoder(input_ids=..., attention_mask=...).last_hidden_state`` gives the final (normed)
    hidden states ``[B, T, D]``, so ``logits = hidden @ head_weight.T``. With tied embeddings
    the head weight is the input embedding matrix (the same Parameter).
    """
    model = unwrap_model(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise ValueError(f"cannot find the base transformer of {type(model).__name__}")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias; the chunked loss assumes none")
    return decoder, head.weight
