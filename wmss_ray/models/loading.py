"""Safe loading of HF causal LMs and tokenizers, the weak/strong pair check, strong export.

Local directories only (no hub on the machines this runs on), safetensors only, remote code
off unless the caller passes ``trust_remote_code=True`` (``cfg.models.trust_remote_code``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

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


def _local_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path} (expected a local HF directory)")
    return p


def has_safetensors(path: str | Path) -> bool:
    """True when ``path`` holds safetensors weights (single file or sharded index)."""
    p = Path(path)
    return any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json"))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """``AutoTokenizer`` from a local directory (no network, no remote code by default)."""
    _local_dir(path, "tokenizer")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)


def load_causal_lm(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    zero3_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM from a local HF directory, safetensors weights only, moved to ``device``.

    ``zero3_config``: a DeepSpeed config dict with ZeRO stage 3 (needs an initialised
    ``torch.distributed`` group): see :func:`_load_zero3`; ``device`` is then not used (the
    partitions live where DeepSpeed puts them: the rank's accelerator, or CPU).

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist or has no safetensors weights
            (e.g. only ``pytorch_model.bin``, which is never unpickled here).
    """
    p = _local_dir(path, "model")
    if not has_safetensors(p):
        found = sorted(f.name for f in p.iterdir())[:8]
        raise FileNotFoundError(
            f"no safetensors weights in model directory {path} (found: {found}); "
            "convert the checkpoint to safetensors first"
        )
    kwargs = dict(dtype=resolve_dtype(dtype, device), use_safetensors=True, trust_remote_code=trust_remote_code,
                  local_files_only=True)
    if zero3_config is not None:
        return _load_zero3(p, kwargs["dtype"], trust_remote_code, zero3_config)
    return AutoModelForCausalLM.from_pretrained(str(p), **kwargs).to(device)


def _load_zero3(path: Path, dtype: torch.dtype, trust_remote_code: bool, zero3_config: dict[str, Any]) -> PreTrainedModel:
    """Build the model under ``deepspeed.zero.Init`` and scatter the safetensors weights into it.

    No rank ever holds the whole model: ``zero.Init`` partitions each parameter over the ranks
    as soon as its module is constructed, then the weights are loaded one module at a time —
    the module's parameters are gathered (``GatheredParameters(modifier_rank=0)``), rank 0
    copies them from the safetensors file(s), reading only those tensors, and on exit DeepSpeed
    broadcasts them and every rank keeps its own partition. Peak host memory per rank: its
    partitions (~1/W of the model) plus one module whole. (transformers' own ZeRO-3 path needs
    ``accelerate`` and reads the whole checkpoint into rank 0's memory.)

    Raises:
        ValueError: ``zero3_config`` is not stage 3, or a parameter is not in the checkpoint
            (naming it and the directory).
    """
    import deepspeed
    from safetensors import safe_open
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights

    if zero3_config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("load_causal_lm(zero3_config=...) needs a DeepSpeed config with zero_optimization.stage 3")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    # No random init (every weight is overwritten, and the placeholders are empty), so tie by hand.
    # zero.Init takes the dtype from the config (its dtype argument is ignored on a CPU that lacks
    # fp16 kernels), so the config must say the same as ``dtype``.
    cfg_dtype = (torch.bfloat16 if zero3_config.get("bf16", {}).get("enabled") else
                 torch.float16 if zero3_config.get("fp16", {}).get("enabled") else torch.float32)
    if cfg_dtype != dtype:
        raise ValueError(f"zero3_config trains in {cfg_dtype}, but the model is loaded in {dtype}")
    if not deepspeed.comm.is_initialized():  # zero.Init sizes the partitions from DeepSpeed's view of the group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=zero3_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    where: dict[str, str] = {}  # tensor name -> safetensors file
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            where.update((k, str(f)) for k in st.keys())
    rank0 = torch.distributed.get_rank() == 0
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        params = [(f"{prefix}.{n}" if prefix else n, q) for n, q in module.named_parameters(recurse=False)
                  if id(q) not in seen]
        if not params:
            continue
        seen.update(id(q) for _, q in params)
        missing = [n for n, _ in params if n not in where]
        if missing:
            raise ValueError(f"{path}: parameter(s) {missing[:5]} are not in the safetensors checkpoint")
        with deepspeed.zero.GatheredParameters([q for _, q in params], modifier_rank=0):
            if rank0:
                for name, q in params:
                    with safe_open(where[name], framework="pt") as st, torch.no_grad():
                        q.copy_(st.get_tensor(name).to(q.dtype))
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    return model


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
        _local_dir(path, "model")
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
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
