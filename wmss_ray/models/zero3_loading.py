"""ZeRO-3 loading without a full copy per rank: build under ``deepspeed.zero.Init``, scatter weights.

Used by :func:`wmss_ray.models.loading.load_causal_lm` when it is given a stage-3 DeepSpeed
config (the Train workers at ``training.zero_stage: 3``, the weak pool's ZeRO-3 shards).
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from wmss_ray.models.ds_comm import init_deepspeed_comm


def load_zero3(path: Path, dtype: torch.dtype, trust_remote_code: bool, zero3_config: dict[str, Any],
               attn_implementation: str) -> PreTrainedModel:
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
    init_deepspeed_comm()  # zero.Init sizes the partitions from DeepSpeed's view of the group
    build = dict(dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    buffers = reference_buffers(config, **build)  # also imports the model's code before zero.Init
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=zero3_config):
        model = AutoModelForCausalLM.from_config(config, **build)
    restore_buffers(model, buffers)
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
    release_freed_host_memory()
    return model


def reference_buffers(config: Any, **from_config_kwargs: Any) -> dict[str, torch.Tensor]:
    """The model's buffers as ``from_config`` makes them outside ``zero.Init`` (CPU, their own dtype).

    Two things ZeRO-3 loading needs from a build outside ``zero.Init``, at no memory cost (every
    parameter goes to the meta device as it is registered; only buffers hold data):

    * **Buffers in their own dtype.** ``zero.Init`` makes every floating-point tensor created during
      construction in the training dtype, buffers included: the rotary ``inv_freq`` (and
      ``original_inv_freq``, and whatever tables a rope type keeps) came out bf16, 4e-3 relative
      error, so the rotation angle at position p was off by p x inv_freq x 4e-3 (radians at a few
      thousand tokens) and stage 3 trained another model than the one exported and evaluated.
      :func:`restore_buffers` puts these values back, for any architecture (no per-model list).
    * **The model's code imported first.** ``zero.Init`` wraps ``__init__`` of each ``nn.Module``
      subclass, including classes *created* while it is active, and on exit puts back the
      ``__init__`` it saw at that moment. A class whose module is first imported inside it loses
      any ``__init__`` a decorator set after class creation: transformers' hub-kernel hooks
      (``use_kernelized_func``, active when the ``kernels`` package is installed, which
      transformers >= 5.25 requires) set ``_kernel_funcs`` in such an ``__init__``, so every model
      built later in the process failed at its first forward (``... '_kernel_funcs'``).

    Returns: ``{buffer name: tensor}`` as ``model.named_buffers()`` names them.
    """
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device("cpu"), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    return dict(model.named_buffers())


def restore_buffers(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """Replace each floating-point buffer of ``model`` by ``reference``'s, in the reference's dtype.

    Buffers are not partitioned by ZeRO-3 (every rank keeps them whole on its device), and the
    DeepSpeed engine keeps fp32 buffers in fp32 under bf16 training, so this holds for training.
    """
    for name, buf in list(model.named_buffers()):
        ref = reference.get(name)
        if ref is None or not ref.is_floating_point():
            continue
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = ref.to(device=buf.device)


@contextmanager
def _parameters_on_meta():
    """Inside: each parameter moves to the meta device as it is registered; buffers stay real."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters[name]
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def release_freed_host_memory() -> None:
    """Hand freed heap blocks back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Gathering one module at a time allocates and frees a whole module's tensors per module; glibc
    keeps those blocks in its arenas, so without this the rank's resident memory stays near the
    largest total it ever held instead of its partitions.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass
