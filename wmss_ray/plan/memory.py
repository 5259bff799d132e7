"""``wmss plan``: the GPU memory a config needs, per GPU, before anything is launched.

Figures are estimates from the models' shapes (``config.json`` read from the model directory,
parameters counted on the meta device: no weights are loaded) and the training settings. Model
states follow DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``) for mixed
precision with AdamW; activations follow :func:`wmss_ray.plan.activations.activation_bytes`. See
docs/TRAINING.md, "The memory picture".

Per trained model with P parameters on G data-parallel ranks, bf16/fp16 (bytes):

=========  ==================  ===================  ==================
ZeRO       parameters          gradients            optimizer states
=========  ==================  ===================  ==================
1          2P                  6P (bf16 + fp32)     12P/G (fp32 master, Adam m, v)
2          2P                  6P/G                 12P/G
3          2P/G (+4 x largest  4P/G (fp32)          12P/G
           layer, gathered)
=========  ==================  ===================  ==================

Offloading the optimizer moves gradients and optimizer states to the CPU; offloading the
parameters (ZeRO-3) moves the parameter partitions too. fp32 weights (fp32 training, or
``training.autocast``: bf16 compute): parameters 4P, gradients 4P, optimizer 8P at ZeRO-0 and
12P/G at ZeRO 1-3 (ZeRO clones the fp32 partition as its master copy), partitioned the same way;
under autocast also the bf16 weight copies the forward keeps
(:func:`wmss_ray.plan.activations.autocast_cast_bytes`). A frozen weak model has parameters only
(partitioned at ZeRO-3 alongside the strong one); a weak model in the inference pool
(``mix.placement: pool``) takes nothing on the Train GPUs: it is on the pool's actors
(:func:`pool_actor_bytes`, printed as its own line); nor does the ``mix.weak_source: uniform``
control's, which is never loaded (docs/CONTROLS.md).

LoRA (``training.lora``): the base weights are frozen (parameters only, as a frozen model) and
only the adapters (:func:`lora_params`) have gradients and optimizer states. A weak model that is
the strong model's own base (iteration 1 after an SFT-LoRA phase, and every later iteration:
:func:`shares_base`) has no weights of its own: its forward runs the strong model's base with the
adapter switched off; in joint mode its own adapter is trained.
"""

from __future__ import annotations

from typing import NamedTuple

from wmss_ray.config.schema import LoraConfig, WMSSConfig
from wmss_ray.io import storage
from wmss_ray.losses.mixing import chunk_rows_for
from wmss_ray.plan.activations import activation_bytes, autocast_cast_bytes
from wmss_ray.plan.shapes import ModelShape
from wmss_ray.training.checkpointing import checkpoint_bytes
from wmss_ray.training.validation import validation_bytes
from wmss_ray.weak_pool.server import pool_dtype
from wmss_ray.weak_pool.wire import device_reply_bytes

GiB = 2**30
#: CUDA context, NCCL buffers and allocator fragmentation, per GPU (a rule of thumb).
OVERHEAD_BYTES = 2 * GiB
#: DeepSpeed's default ``zero_optimization.reduce_bucket_size`` (elements; deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET_SIZE = 500_000_000
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


def model_state_bytes(p: int, largest: int, *, half: bool, trained: bool, stage: int,
                      offload_optimizer: bool, offload_params: bool, world: int,
                      autocast: bool = False) -> dict[str, float]:
    """Per-GPU bytes of one model's parameters, gradients and optimizer states (table above).
    ``autocast`` (``training.autocast``): a trained model is fp32 throughout; a frozen one keeps
    the compute dtype below stage 3 (ZeRO-3's one ``zero.Init`` builds every model in fp32)."""
    if autocast:
        half = not trained and stage < 3
    w = 2 if half else 4
    params = 0.0 if (stage == 3 and offload_params) else (w * p / world if stage == 3 else w * p)
    out = {"params": params, "grads": 0.0, "optimizer": 0.0}
    if trained and not offload_optimizer:
        if half:
            out["grads"] = {0: 6 * p, 1: 6 * p, 2: 6 * p / world, 3: 4 * p / world}[stage]
            out["optimizer"] = 12 * p / (world if stage >= 1 else 1)
        else:  # ZeRO 1-3 clone the fp32 weights' partition as their master copy (stage_1_and_2.py)
            out["grads"] = 4 * p / (world if stage >= 2 else 1)
            out["optimizer"] = 12 * p / world if stage >= 1 else 8 * p
    return out


def gradient_bucket_bytes(ds_config: dict) -> float:
    """Device bytes of DeepSpeed's gradient-reduction (IPG) bucket, allocated whole per GPU: at
    engine build (stage 3) or at the first backward (stage 1/2). ``ds_config``: the DeepSpeed
    config the trainer builds (``training.ds_config.build_ds_config``, overrides included).

    - stage 3: one buffer of ``reduce_bucket_size`` elements in ``communication_data_type``
      (under bf16 our config reduces in fp32: 5e8 x 4 B = 1.86 GiB by default);
    - stage 1 with bf16 models, fp32 accumulation and no optimizer offload: none (DeepSpeed
      uses its BF16_Optimizer, whose full fp32 gradient buffer is in the gradients line);
    - other stage 1: in the gradient-accumulation dtype when it differs from the model's, stage 2:
      in the model dtype; twice with ``overlap_comm`` (off below stage 3 by default); none with
      ``contiguous_gradients: false`` and no optimizer offload;
    - stage 0: none (DeepSpeed's plain all-reduce flattens per bucket, transient).
    Read from deepspeed/runtime/zero/stage3.py and stage_1_and_2.py (0.19) and checked against
    real engines' buffers in ``tests/training/test_training_units.py``.
    """
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    model = 2 if (ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")) else 4
    accum = _DTYPE_BYTES[ds_config.get("data_types", {}).get("grad_accum_dtype") or ("fp32" if model == 4 else "bf16")]
    n = float(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE))
    if stage == 3:
        comm = ds_config.get("communication_data_type")
        return n * (_DTYPE_BYTES[comm] if comm else model) if zero.get("contiguous_gradients", True) else 0.0
    offload = "offload_optimizer" in zero
    bf16_optimizer = stage == 1 and ds_config.get("bf16", {}).get("enabled") and accum == 4 and not offload
    if stage == 0 or bf16_optimizer or not (zero.get("contiguous_gradients", True) or offload):
        return 0.0
    width = accum if (stage == 1 and accum != model) else model
    return n * width * (2 if zero.get("overlap_comm", False) else 1)


def is_half(cfg: WMSSConfig) -> bool:
    """The models compute in bf16/fp16 (``models.dtype`` auto is bf16 with ``scaling.use_gpu``)."""
    return cfg.models.dtype in ("bfloat16", "float16") or (cfg.models.dtype == "auto" and cfg.scaling.use_gpu)


def half_weights(cfg: WMSSConfig) -> bool:
    """The trained weights are 2 bytes: half precision without ``training.autocast`` (fp32 weights)."""
    return is_half(cfg) and not cfg.training.autocast


class GpuModel(NamedTuple):
    """One model's share of a Train GPU."""

    shape: ModelShape
    trained: bool  # gradients flow through it: its activations are kept for backward
    weights: bool  # its own weights are here (False: the strong model's base, shared)
    trained_params: int  # parameters with gradients and optimizer states (all, the adapter's, or 0)


#: The linear layers ``training.lora.target_modules: all-linear`` adapts in an HF decoder layer,
#: by their usual names, and each one's ``in + out`` as a function of the shape.
_LORA_SIDES = {
    "q_proj": lambda s: s.hidden + s.heads * s.head_dim, "k_proj": lambda s: s.hidden + s.kv_heads * s.head_dim,
    "v_proj": lambda s: s.hidden + s.kv_heads * s.head_dim, "o_proj": lambda s: s.heads * s.head_dim + s.hidden,
    "gate_proj": lambda s: s.hidden + s.intermediate, "up_proj": lambda s: s.hidden + s.intermediate,
    "down_proj": lambda s: s.intermediate + s.hidden,
}


def lora_params(shape: ModelShape, lora: LoraConfig) -> int:
    """Parameters of one adapter: ``r (in + out)`` per adapted linear layer (``A [r, in]``,
    ``B [out, r]``), over every decoder layer; a target list counts the usual names it holds."""
    names = _LORA_SIDES if lora.target_modules == "all-linear" else [n for n in lora.target_modules if n in _LORA_SIDES]
    return lora.r * shape.layers * sum(_LORA_SIDES[n](shape) for n in names)


def shares_base(cfg: WMSSConfig) -> bool:
    """The WMSS weak model is the strong model's base (LoRA, colocated, no ``models.strong`` /
    ``models.weak`` of the user's: weak M_{t-1} and strong M_t are adapters on M0)."""
    m = cfg.models
    return cfg.training.lora.enabled and cfg.mix.placement == "colocated" and not m.strong and not m.weak


def phase_bytes(cfg: WMSSConfig, phase: str, strong: ModelShape, weak: ModelShape) -> dict[str, float]:
    """Per-GPU bytes by component for ``phase`` ("sft" or "wmss") under ``cfg``."""
    t, mix = cfg.training, cfg.mix
    half = is_half(cfg)
    act_b = 2 if half else 4
    world = cfg.scaling.num_workers
    seq, mb = cfg.data.max_seq_len, t.micro_batch_size
    tokens = seq * mb  # padded micro-batch (packing keeps the same token count)
    eager = cfg.models.attn_implementation == "eager"
    states = dict(half=half, stage=t.zero_stage, offload_optimizer=t.offload_optimizer,
                  offload_params=t.offload_params, world=world, autocast=t.autocast)
    out = dict.fromkeys(("params", "grads", "optimizer"), 0.0)
    models = train_gpu_models(cfg, phase, strong, weak)
    lora = t.lora.enabled
    for m in models:
        parts = []
        if not lora:  # full fine-tuning: the whole model trained, or frozen
            parts.append(model_state_bytes(m.shape.params, m.shape.largest_layer_params, trained=m.trained, **states))
        else:  # the frozen base (unless shared), the adapter's states
            if m.weights:
                parts.append(model_state_bytes(m.shape.params, m.shape.largest_layer_params, trained=False, **states))
            if m.trained_params:
                parts.append(model_state_bytes(m.trained_params, 0, trained=True, **states))
        for part in parts:
            for k, v in part.items():
                out[k] += v
    out["zero3_gather"] = 4.0 * max(m.shape.largest_layer_params for m in models) if t.zero_stage == 3 else 0.0
    out["autocast_casts"] = sum(autocast_cast_bytes(m.shape, m.trained, t.gradient_checkpointing) for m in models
                                if m.trained or t.zero_stage == 3) if t.autocast else 0.0
    for key, ckpt in (("activations", t.gradient_checkpointing), ("activations_alt", not t.gradient_checkpointing)):
        out[key] = sum(activation_bytes(m.shape, tokens, seq, mb, act_b, checkpointing=ckpt, eager=eager,
                                        trained=m.trained, autocast=t.autocast and m.trained) for m in models)
    # the head and the embedding are trained only by full fine-tuning (LoRA adapts linear layers)
    full = [m.shape for m in models if m.trained and not lora]
    chunk = chunk_rows_for(tokens, strong.vocab, mix.loss_chunk_mb(cfg.scaling.use_gpu))
    out["loss_chunk"] = 4.0 * min(chunk, tokens) * strong.vocab
    out["loss_chunk_rows"] = float(min(chunk, tokens))
    # fp32 accumulators of the head-weight gradients (+ their cast to bf16 at backward)
    out["loss_head_grads"] = sum((4 + (2 if half else 0)) * m.vocab * m.hidden for m in full)
    # embedding gradient, w V D per trained model where no other line holds it: tied, the head's
    # share (the loss's backward) waits in autograd for the embedding lookup's share until the end
    # of the backward, one parameter's gradient; ZeRO-2, the full-size [V, D] gradient lives until
    # DeepSpeed's bucket takes it. (ZeRO-3: in the gathered-layer line, 2 bytes of gathered weight
    # + 2 of gradient per element; ZeRO-0/1: in the gradients line.)
    grad_b = 4 if t.autocast else act_b  # autocast: fp32 weights, fp32 gradients
    out["embedding_grads"] = float(sum(grad_b * m.vocab * m.hidden * (int(m.tied) + int(t.zero_stage == 2))
                                       for m in full))
    pool, p = phase == "wmss" and mix.placement == "pool", mix.pool
    # the pool's reply on this GPU (weak_pool.wire.device_reply_bytes) for N <= tokens answer
    # positions: N (12 k + 8) (top-k fp32 log-probs + int64 ids, label, tail), dense (top_k 0) 4 V N
    out["pool_reply"] = float(device_reply_bytes(tokens, p.top_k, strong.vocab)) if pool else 0.0
    # a logged step's exact-sample rows, n = mix.pool.exact_sample: their dense weak rows (4 V + 8)
    # n, the strong logits of those rows w V n and losses.weak_side.truncation_error's float64
    # [n, V] temporaries (about six live at once: 48 V n)
    n = min(p.exact_sample, tokens)
    out["pool_exact"] = float(device_reply_bytes(0, p.top_k, strong.vocab, n) + (act_b + 48) * n * strong.vocab) \
        if pool else 0.0
    out["grad_bucket"] = gradient_bucket_bytes(_ds_config(cfg, half))
    out["overhead"] = float(OVERHEAD_BYTES)
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out


def train_gpu_models(cfg: WMSSConfig, phase: str, strong: ModelShape, weak: ModelShape) -> list[GpuModel]:
    """The models on a Train GPU in ``phase``: the strong one, and in WMSS the colocated weak one
    (trained in joint mode; no weights of its own on a shared base). None when ``mix.lam`` is 1,
    nor for ``mix.weak_source: uniform`` (the 1/V fake weak side needs no weak forward: the
    workers load no weak model); ``entropy_matched`` and ``shuffled`` run the real frozen one."""
    mix, lora = cfg.mix, cfg.training.lora

    def trained(shape: ModelShape) -> int:
        return lora_params(shape, lora) if lora.enabled else shape.params

    models = [GpuModel(strong, True, True, trained(strong))]
    if phase == "wmss" and mix.placement == "colocated" and mix.lam != 1.0 and mix.weak_source != "uniform":
        joint = mix.mode == "joint"
        models.append(GpuModel(weak, joint, not shares_base(cfg), trained(weak) if joint else 0))
    return models


def validation_peak(cfg: WMSSConfig, strong: ModelShape, wmss: dict[str, float]) -> dict[str, float] | None:
    """Per-GPU bytes while a WMSS phase validates itself (``wmss tune`` trials with ``tune.seeds``
    1 and ``tune.eval_every`` > 0: ``training/validation.py``); None when the config has none.

    After an optimizer step: the training state stays (parameters, gradients, optimizer,
    gathered layer, gradient bucket, overhead of ``wmss``), activations and loss buffers are
    freed; the rank adds ``training.validation.validation_bytes`` (the model copy, then the
    larger of generation, KV cache + one layer's prefill transient, and the teacher-forced CE,
    its logits + one layer's transient).
    """
    if not (cfg.tune.eval_every and cfg.tune.seeds == 1):
        return None
    ev, seq, s = cfg.evaluation, cfg.data.max_seq_len, strong
    w, eager = (2 if is_half(cfg) else 4), cfg.models.attn_implementation == "eager"
    v = validation_bytes(s.params, s.layers, s.kv_heads, s.head_dim, s.vocab, dtype_bytes=w, batch=ev.batch_size,
                         seq=seq, new_tokens=ev.max_new_tokens, logits_mb=ev.logits_mb)
    rows = int(v["ce_rows"])
    v["prefill"] = activation_bytes(s, ev.batch_size * seq, seq, ev.batch_size, w, checkpointing=False, eager=eager,
                                    trained=False)
    v["ce_forward"] = activation_bytes(s, rows * seq, seq, rows, w, checkpointing=False, eager=eager, trained=False)
    kept = sum(wmss[k] for k in ("params", "grads", "optimizer", "zero3_gather", "grad_bucket", "overhead"))
    v["total"] = kept + v["weights"] + max(v["kv_cache"] + v["prefill"], v["ce_logits"] + v["ce_forward"])
    return v


def staging_bytes(cfg: WMSSConfig, phase: str, strong: ModelShape, weak: ModelShape,
                  ranks_per_node: int) -> dict[str, float]:
    """Local disk bytes of the checkpoint staging (``training.staging_dir``) in ``phase``: per rank
    (rank 0, the largest) and on rank 0's node of ``ranks_per_node`` ranks, from
    ``training.checkpointing.checkpoint_bytes`` of each trained model; ``export``: the strong
    model exported through the same directory on rank 0's node when ``run.storage`` is object
    storage (w P; a local run dir is written in place). A checkpoint is uploaded and its staging
    deleted before the export starts, so a node needs the larger of the two."""
    t, world = cfg.training, cfg.scaling.num_workers
    trained = [m.trained_params for m in train_gpu_models(cfg, phase, strong, weak) if m.trained_params]
    per = [sum(checkpoint_bytes(p, half=half_weights(cfg), stage=t.zero_stage, world=world, rank=r)
               for p in trained) for r in (0, 1)]
    ranks = max(1, min(ranks_per_node, world))
    export = (2 if half_weights(cfg) else 4) * strong.params if storage.is_remote(cfg.run.storage) else 0.0
    return {"rank": per[0], "node": per[0] + (ranks - 1) * per[1], "ranks": float(ranks), "export": float(export)}


def _ds_config(cfg: WMSSConfig, half: bool) -> dict:
    """The DeepSpeed config the Train workers would build for ``cfg`` (one definition of it)."""
    import torch

    from wmss_ray.training.ds_config import build_ds_config

    dtype = (torch.float16 if cfg.models.dtype == "float16" else torch.bfloat16) if half else torch.float32
    return build_ds_config(cfg.training, cfg.scaling.num_workers, dtype, cfg.scaling.use_gpu)


def pool_actor_bytes(cfg: WMSSConfig, weak: ModelShape) -> dict[str, float]:
    """Bytes of one weak-pool actor (``mix.placement: pool``), one micro-batch request at a time.

    Inference only (``weak_pool.server.WeakServer``): the weights (a full copy when
    ``mix.pool.shards`` S is 1; a ZeRO-3 partition ``1/S`` plus one gathered layer, 4 x its
    parameter count, for S > 1), one decoder layer's transient activations, and the logits of
    one answer chunk (``[chunk, V]`` in the model dtype plus its fp32 log-softmax copy; the chunk
    from ``mix.chunk_mb`` as the loss's). Replies go to host memory.
    """
    p = cfg.mix.pool
    w = 2 if pool_dtype(cfg.models.dtype, p.gpus_per_actor) in ("bfloat16", "float16") else 4
    seq, mb = cfg.data.max_seq_len, cfg.training.micro_batch_size
    tokens = seq * mb
    out = {"params": w * weak.params / p.shards,
           "zero3_gather": 4.0 * weak.largest_layer_params if p.shards > 1 else 0.0,
           "activations": activation_bytes(weak, tokens, seq, mb, w, checkpointing=False,
                                           eager=cfg.models.attn_implementation == "eager", trained=False)}
    chunk = min(chunk_rows_for(tokens, weak.vocab, cfg.mix.loss_chunk_mb(cfg.mix.pool.gpus_per_actor > 0)), tokens)
    out["logits_chunk"] = (4.0 + (w if w != 4 else 0)) * chunk * weak.vocab
    # top-k of a chunk (losses.weak_side.weak_from_logp): the masked fp32 copy of the chunk and
    # logsumexp's exp (8 c V), the top-k fp32 values + int64 ids (12 c k); dense (top_k 0): none
    out["topk_temps"] = (8.0 * chunk * weak.vocab + 12.0 * chunk * p.top_k) if p.top_k else 0.0
    # the decoder's final hidden states [B, T, D] and the answer rows' copy [N <= tokens, D]
    out["hidden"] = 2.0 * w * tokens * weak.hidden
    # the exact-sample rows gathered from a chunk for the reply: n x V fp32, n = mix.pool.exact_sample
    out["exact_rows"] = 4.0 * min(p.exact_sample, tokens) * weak.vocab
    out["overhead"] = float(OVERHEAD_BYTES) if p.gpus_per_actor > 0 else 0.0
    out["total"] = sum(out.values())
    return out


#: Components summed into the total, with their labels.
COMPONENTS = {
    "params": "parameters",
    "grads": "gradients",
    "optimizer": "optimizer states",
    "zero3_gather": "ZeRO-3 gathered layer",
    "autocast_casts": "autocast bf16 weight copies",
    "activations": "activations",
    "loss_chunk": "loss [chunk, V] fp32 buffer",
    "loss_head_grads": "loss head-gradient accumulators",
    "embedding_grads": "embedding gradient",
    "pool_reply": "weak pool reply (top-k buffers)",
    "pool_exact": "weak pool exact-sample rows",
    "grad_bucket": "DeepSpeed gradient bucket",
    "overhead": "CUDA context, NCCL, fragmentation",
}
