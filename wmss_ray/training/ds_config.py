"""DeepSpeed configuration, optimizer, learning-rate schedule and engine construction.

One DeepSpeed engine wraps the :class:`~wmss_ray.training.pair.PairLM` (strong model, plus the
weak model in WMSS). The optimizer is a *client* optimizer (``torch.optim.AdamW``) so that CPU
runs need no JIT-compiled DeepSpeed Adam; the schedule is a ``LambdaLR`` that DeepSpeed steps
once per optimizer step (at each gradient-accumulation boundary).

Everything here is plain code: no Ray.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from wmss_ray.config.schema import TrainingConfig
from wmss_ray.models.ds_comm import init_deepspeed_comm
from wmss_ray.training.schedule import lr_factor, warmup_steps_for

# ----------------------------------------------------------------------------- schedule


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, training: TrainingConfig):
    """``LambdaLR`` applying :func:`lr_factor` to every param group's own base lr."""
    warmup = warmup_steps_for(total_steps, training.warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, training.min_lr_ratio)
    )


# ----------------------------------------------------------------------------- optimizer


def param_groups(named_modules: dict[str, tuple[torch.nn.Module, float]], weight_decay: float) -> list[dict]:
    """AdamW param groups: per model its own lr, weight decay on matrices only.

    ``named_modules``: ``{"strong": (module, lr), "weak": (module, lr)}``; frozen parameters
    (``requires_grad=False``) are left out. Norm weights and biases (``ndim < 2``) get no decay.
    A parameter shared inside one model (tied embeddings) appears once.
    """
    groups = []
    seen: set[int] = set()
    for name, (module, lr) in named_modules.items():
        decay, no_decay = [], []
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            # under ZeRO-3's zero.Init a parameter is a 1-D placeholder; its real shape is ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        for params, wd, suffix in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{name}.{suffix}"})
    return groups


def build_optimizer(groups: list[dict], training: TrainingConfig, on_gpu: bool) -> torch.optim.Optimizer:
    """The client optimizer.

    GPU with optimizer offload: DeepSpeed's CPU Adam (the only fast optimizer over CPU-resident
    fp32 states; JIT-compiled once). Otherwise ``torch.optim.AdamW`` (fused kernel on GPU).
    """
    if on_gpu and training.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=training.lr, weight_decay=training.weight_decay, adamw_mode=True)
    kwargs = {"fused": True} if on_gpu else {}
    return torch.optim.AdamW(groups, lr=training.lr, weight_decay=training.weight_decay, **kwargs)


# ----------------------------------------------------------------------------- DeepSpeed config


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(training: TrainingConfig, world_size: int, dtype: torch.dtype, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for one phase.

    ``train_batch_size = micro_batch_size * grad_accum * world_size``; ZeRO stage, offload and
    clipping from ``training``; bf16 / fp16 from ``dtype`` (the models' compute dtype: bf16 on
    GPU, fp32 on CPU by default). ``training.ds_config_overrides`` is deep-merged last.

    Under bf16 / fp16 the gradients are accumulated over micro-batches and reduced over ranks
    in fp32 (``data_types.grad_accum_dtype`` and ``communication_data_type``): summing many
    micro-batches' bf16 gradients in bf16 loses their low bits (8 mantissa bits). DeepSpeed 0.19
    offers fp32 accumulation only with ZeRO (stage 0 would update the bf16 weights with bf16
    gradients directly), so half precision needs ``zero_stage >= 1``.

    ``training.autocast``: the trained weights are fp32 (``dtype`` is the compute dtype, bf16):
    DeepSpeed's ``torch_autocast`` runs the forward under ``torch.autocast`` and the optimizer
    steps the fp32 weights directly, with no master copies, at any stage. ``lower_precision_safe_modules``
    is empty so that no gradient is reduced, and no ZeRO-3 weight gathered, in bf16 (DeepSpeed's
    default would do both for ``nn.Linear``): fp32 throughout, as a plain DDP loop reduces.

    Raises:
        ValueError: naming the ``training`` key that cannot be honoured.
    """
    half = dtype in (torch.bfloat16, torch.float16)
    if training.autocast:
        if dtype != torch.bfloat16:
            raise ValueError(f"training.autocast computes in bfloat16; the models' dtype here is {dtype}")
        precision = {"bf16": {"enabled": False},
                     "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
    else:
        if half and training.zero_stage == 0:
            raise ValueError(
                f"training.zero_stage: 0 with {dtype} models: DeepSpeed accumulates gradients in fp32 only "
                "under ZeRO; set training.zero_stage >= 1 (stage 1 on one GPU costs no more memory than "
                "stage 0 and keeps fp32 master weights) or models.dtype: float32"
            )
        precision = {
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0},
            **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if half else {}),
        }
    return _deep_merge(_base_config(training, world_size, on_gpu) | precision, training.ds_config_overrides)


def _base_config(training: TrainingConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config without its precision keys: batch, ZeRO stage and offload, clipping."""
    if training.offload_params and training.zero_stage != 3:
        raise ValueError("training.offload_params needs training.zero_stage: 3 (parameters are only partitioned at stage 3)")
    if training.offload_optimizer and training.zero_stage == 0:
        raise ValueError("training.offload_optimizer needs training.zero_stage >= 1")
    pin = bool(on_gpu)
    zero: dict[str, Any] = {"stage": training.zero_stage}
    if training.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if training.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "train_batch_size": training.micro_batch_size * training.grad_accum * world_size,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": zero,
        # A torch AdamW client optimizer is allowed with offload (DeepSpeed would otherwise insist
        # on its JIT-compiled CPU Adam, ~2 min of compilation on a CPU-only machine).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_engine(model: torch.nn.Module, groups: list[dict], training: TrainingConfig, world_size: int,
                total_steps: int, dtype: torch.dtype, on_gpu: bool):
    """``deepspeed.initialize`` the model with the client AdamW and the warm-up/cosine schedule.

    Returns the engine; ``engine.optimizer`` / ``engine.lr_scheduler`` are DeepSpeed's wrappers.
    """
    import deepspeed

    init_deepspeed_comm()  # before initialize, which would start the backend with its shm op
    _forget_earlier_autocast()
    optimizer = build_optimizer(groups, training, on_gpu)
    scheduler = build_scheduler(optimizer, total_steps, training)
    config = build_ds_config(training, world_size, dtype, on_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


def _forget_earlier_autocast() -> None:
    """DeepSpeed 0.19 records "torch_autocast is on" in module globals (``runtime/torch_autocast.py``)
    that no engine resets, and its ZeRO optimizers read them for every gradient they reduce
    (``get_param_comm_dtype``): after one ``training.autocast`` engine in a process, every later
    engine reduced its gradients in the parameters' dtype (bf16) instead of the configured fp32.
    Each engine starts from a clean state; an autocast engine sets it again in ``initialize``."""
    import deepspeed.runtime.torch_autocast as ds_autocast

    ds_autocast.TORCH_AUTOCAST_INITIALIZED = False
    ds_autocast.TORCH_AUTOCAST_DTYPE = None
