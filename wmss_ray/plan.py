"""``wmss plan``: the GPU memory a config needs, per GPU, before anything is launched.

Figures are estimates from the models' shapes (``config.json`` read from the model directory,
parameters counted on the meta device: no weights are loaded) and the training settings. Model
states follow DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``) for mixed
precision with AdamW; activations follow the formula in :func:`activation_bytes`. See
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
parameters (ZeRO-3) moves the parameter partitions too. fp32 training: parameters 4P,
gradients 4P, optimizer 8P, partitioned the same way. A frozen weak model has parameters only
(partitioned at ZeRO-3 alongside the strong one); a weak model in the inference pool
(``mix.placement: pool``) takes nothing on the Train GPUs: it is on the pool's actors
(:func:`pool_actor_bytes`, printed as its own line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wmss_ray.config.loading import check_model_dir, config_from_dict
from wmss_ray.config.schema import ConfigError, WMSSConfig
from wmss_ray.io import storage
from wmss_ray.losses.mixing import chunk_rows_for
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
        return AutoConfig.from_pretrained(tmp, local_files_only=True)


def model_state_bytes(p: int, largest: int, *, half: bool, trained: bool, stage: int,
                      offload_optimizer: bool, offload_params: bool, world: int) -> dict[str, float]:
    """Per-GPU bytes of one model's parameters, gradients and optimizer states (table above)."""
    w = 2 if half else 4
    params = 0.0 if (stage == 3 and offload_params) else (w * p / world if stage == 3 else w * p)
    out = {"params": params, "grads": 0.0, "optimizer": 0.0}
    if trained and not offload_optimizer:
        if half:
            out["grads"] = {0: 6 * p, 1: 6 * p, 2: 6 * p / world, 3: 4 * p / world}[stage]
            out["optimizer"] = 12 * p / (world if stage >= 1 else 1)
        else:
            out["grads"] = 4 * p / (world if stage >= 2 else 1)
            out["optimizer"] = 8 * p / (world if stage >= 1 else 1)
    return out


def activation_bytes(s: ModelShape, tokens: int, seq_len: int, micro_batch: int, act_bytes: int, *,
                     checkpointing: bool, eager: bool, trained: bool = True) -> float:
    """Activations one model keeps for backward (or, frozen, the transient of one layer).

    Elements kept per token per decoder layer (bf16: 2 bytes each), flash/sdpa attention:
    ``e = 4 h + 2 h_q + 2 d_kv + 4 I (+ h_q + d_kv with q/k norms)`` where ``h`` = hidden size,
    ``h_q`` = heads x head_dim, ``d_kv`` = kv heads x head_dim, ``I`` = intermediate size: the
    two RMSNorm inputs and outputs (4h), rotated q and k and v (h_q + 2 d_kv), the attention
    output (h_q), and SwiGLU's gate, up, silu(gate) and product (4I). Eager attention also keeps
    the ``[heads, s, s]`` scores and probabilities per row (2 x heads x s^2).

    - no checkpointing: ``layers x e x tokens``;
    - checkpointing: each layer's input (``layers x h x tokens``) plus one layer recomputed in
      backward (``e x tokens``);
    - frozen weak model (no grad): one layer's transient, ``e x tokens``.
    """
    e = 4 * s.hidden + 2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + 4 * s.intermediate
    if s.qk_norm:
        e += (s.heads + s.kv_heads) * s.head_dim
    per_layer = e * tokens * act_bytes
    scores = 2 * s.heads * seq_len**2 * micro_batch * act_bytes if eager else 0
    if not trained:
        return per_layer + scores
    if checkpointing:
        return s.layers * s.hidden * tokens * act_bytes + per_layer + scores
    return s.layers * (per_layer + scores)


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
    """The models train in bf16/fp16 (``models.dtype`` auto is bf16 with ``scaling.use_gpu``)."""
    return cfg.models.dtype in ("bfloat16", "float16") or (cfg.models.dtype == "auto" and cfg.scaling.use_gpu)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


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
                  offload_params=t.offload_params, world=world)
    out = dict.fromkeys(("params", "grads", "optimizer"), 0.0)
    models = train_gpu_models(cfg, phase, strong, weak)
    for shape, trained in models:
        for k, v in model_state_bytes(shape.params, shape.largest_layer_params, trained=trained, **states).items():
            out[k] += v
    out["zero3_gather"] = 4.0 * max(m.largest_layer_params for m, _ in models) if t.zero_stage == 3 else 0.0
    for key, ckpt in (("activations", t.gradient_checkpointing), ("activations_alt", not t.gradient_checkpointing)):
        out[key] = sum(activation_bytes(m, tokens, seq, mb, act_b, checkpointing=ckpt, eager=eager, trained=tr)
                       for m, tr in models)
    chunk = chunk_rows_for(tokens, strong.vocab, mix.chunk_mb)
    out["loss_chunk"] = 4.0 * min(chunk, tokens) * strong.vocab
    out["loss_chunk_rows"] = float(min(chunk, tokens))
    # fp32 accumulators of the head-weight gradients (+ their cast to bf16 at backward)
    out["loss_head_grads"] = sum((4 + (2 if half else 0)) * m.vocab * m.hidden for m, tr in models if tr)
    # embedding gradient, w V D per trained model where no other line holds it: tied, the head's
    # share (the loss's backward) waits in autograd for the embedding lookup's share until the end
    # of the backward, one parameter's gradient; ZeRO-2, the full-size [V, D] gradient lives until
    # DeepSpeed's bucket takes it. (ZeRO-3: in the gathered-layer line, 2 bytes of gathered weight
    # + 2 of gradient per element; ZeRO-0/1: in the gradients line.)
    out["embedding_grads"] = float(sum(act_b * m.vocab * m.hidden * (int(m.tied) + int(t.zero_stage == 2))
                                       for m, tr in models if tr))
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


def train_gpu_models(cfg: WMSSConfig, phase: str, strong: ModelShape, weak: ModelShape) -> list[tuple[ModelShape, bool]]:
    """``[(shape, trained)]`` of the models on a Train GPU in ``phase``: the strong one, and in
    WMSS the colocated weak one (trained in joint mode; none when ``mix.lam`` is 1)."""
    mix = cfg.mix
    weak_on_gpu = phase == "wmss" and mix.placement == "colocated" and mix.lam != 1.0
    return [(strong, True)] + ([(weak, mix.mode == "joint")] if weak_on_gpu else [])


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
                         seq=seq, new_tokens=ev.max_new_tokens)
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
    trained = [m for m, tr in train_gpu_models(cfg, phase, strong, weak) if tr]
    per = [sum(checkpoint_bytes(m.params, half=is_half(cfg), stage=t.zero_stage, world=world, rank=r)
               for m in trained) for r in (0, 1)]
    ranks = max(1, min(ranks_per_node, world))
    export = (2 if is_half(cfg) else 4) * strong.params if storage.is_remote(cfg.run.storage) else 0.0
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
    chunk = min(chunk_rows_for(tokens, weak.vocab, cfg.mix.chunk_mb), tokens)
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


def _pool_lines(cfg: WMSSConfig, weak: ModelShape, gpu_memory: float | None) -> list[str]:
    p = cfg.mix.pool
    b = pool_actor_bytes(cfg, weak)
    parts = ", ".join(f"{label} {b[k] / GiB:.2f}" for k, label in (
        ("params", "weights"), ("zero3_gather", "gathered layer"), ("activations", "activations"),
        ("hidden", "final hidden states"), ("logits_chunk", "logits chunk"), ("topk_temps", "top-k temporaries"),
        ("exact_rows", "exact-sample rows"), ("overhead", "overhead")) if b[k])
    where = f"{p.gpus_per_actor:g} GPU each" if p.gpus_per_actor > 0 else "CPU actors (host memory)"
    lines = ["", f"weak pool (mix.placement: pool): {p.replicas} replica(s) x {p.shards} shard(s), {where}, "
             f"{pool_dtype(cfg.models.dtype, p.gpus_per_actor)}; the weak model takes nothing on the Train GPUs above",
             f"  {'GiB per pool actor':40s} {b['total'] / GiB:10.2f}  ({parts})"]
    if 0 < p.gpus_per_actor < 1:  # Ray does not split memory: a GPU holds up to 1/f such actors
        per_gpu = int(1 / p.gpus_per_actor + 1e-9)
        lines.append(f"  {'GiB per GPU, ' + str(per_gpu) + ' actors sharing it':40s} {per_gpu * b['total'] / GiB:10.2f}"
                     "  (plus whatever else Ray places on that GPU)")
    if gpu_memory is not None and p.gpus_per_actor > 0:
        need = b["total"] * (int(1 / p.gpus_per_actor + 1e-9) if p.gpus_per_actor < 1 else 1)
        verdict = "fits" if need <= gpu_memory else "does NOT fit; raise mix.pool.shards or mix.pool.gpus_per_actor"
        lines.append(f"  the pool {verdict} in {gpu_memory / GiB:.1f} GiB per GPU")
    return lines


#: Components summed into the total, with their labels.
COMPONENTS = {
    "params": "parameters",
    "grads": "gradients",
    "optimizer": "optimizer states",
    "zero3_gather": "ZeRO-3 gathered layer",
    "activations": "activations",
    "loss_chunk": "loss [chunk, V] fp32 buffer",
    "loss_head_grads": "loss head-gradient accumulators",
    "embedding_grads": "embedding gradient",
    "pool_reply": "weak pool reply (top-k buffers)",
    "pool_exact": "weak pool exact-sample rows",
    "grad_bucket": "DeepSpeed gradient bucket",
    "overhead": "CUDA context, NCCL, fragmentation",
}


def parse_memory(text: str) -> float:
    """``"80GiB"`` / ``"80GB"`` / ``"141G"`` / ``"81920MiB"`` -> bytes (GB = 1e9, G = GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory must look like 80GiB, 80GB or 141G, got {text!r}")
    value, unit = float(m.group(1)), m.group(2).upper()
    if not unit:
        return value * GiB
    power = "KMGT".index(unit[0]) + 1
    return value * (1000**power if unit.endswith("B") and "I" not in unit else 1024**power)


def _with(cfg: WMSSConfig, overrides: list[str]) -> WMSSConfig:
    return config_from_dict(cfg.to_dict(), overrides, "<plan>")


def suggestions(cfg: WMSSConfig, strong: ModelShape, weak: ModelShape, budget: float) -> list[tuple[str, float]]:
    """Changes tried in order, each on top of the previous ones: (override, peak bytes after)."""
    t, steps, out = cfg.training, [], []
    if not t.gradient_checkpointing:
        steps.append(["training.gradient_checkpointing=true"])
    if t.zero_stage < 3:
        steps.append(["training.zero_stage=3"])
    if not t.offload_optimizer:
        steps.append(["training.offload_optimizer=true"])
    if not t.offload_params:
        steps.append(["training.offload_params=true"])
    if cfg.mix.placement == "colocated":  # changes the method in joint mode: the weak model stops training
        steps.append(["mix.mode=frozen", "mix.placement=pool"])
    current = cfg
    for change in steps:
        current = _with(current, change)
        peak = max(phase_bytes(current, p, strong, weak)["total"] for p in ("sft", "wmss"))
        note = " (weak model frozen, served by the pool)" if "mix.placement=pool" in change else ""
        out.append((" ".join(f"--set {c}" for c in change) + note, peak))
        if peak <= budget:
            return out
    mb = current.training.micro_batch_size
    while mb > 1:  # halve the micro batch (raise grad_accum to keep the global batch)
        mb //= 2
        trial = _with(current, [f"training.micro_batch_size={mb}"])
        peak = max(phase_bytes(trial, p, strong, weak)["total"] for p in ("sft", "wmss"))
        if peak <= budget or mb == 1:
            out.append((f"--set training.micro_batch_size={mb} (raise training.grad_accum to keep the batch)", peak))
            break
    return out


def format_plan(cfg: WMSSConfig, gpu_memory: float | None, source: str = "", gpus_per_node: int = 8) -> str:
    """The ``wmss plan`` report (a plain-text table); ``gpus_per_node`` sizes the per-node disk line.

    Raises:
        ConfigError: a model directory is missing or unreadable (one line naming its key).
    """
    m, t = cfg.models, cfg.training
    strong_dir, strong_key = (m.strong, "models.strong") if m.strong else (m.base, "models.base")
    weak_dir, weak_key = (m.weak, "models.weak") if m.weak else (m.base, "models.base")
    strong = model_shape(strong_dir, cfg, strong_key)
    weak = strong if weak_dir == strong_dir else model_shape(weak_dir, cfg, weak_key)
    phases = {p: phase_bytes(cfg, p, strong, weak) for p in ("sft", "wmss")}
    prec = "fp16" if m.dtype == "float16" else ("bf16" if is_half(cfg) else "fp32")
    offload = [n for n, on in (("optimizer", t.offload_optimizer), ("params", t.offload_params)) if on]
    lines = [] if cfg.scaling.use_gpu else ["note: scaling.use_gpu is false; the figures are per rank as if on GPUs"]
    lines += [
        f"wmss plan {source}: memory per GPU, {cfg.scaling.num_workers} data-parallel ranks, {prec}, "
        f"ZeRO-{t.zero_stage}{' offload ' + '+'.join(offload) if offload else ''}, micro batch "
        f"{t.micro_batch_size} x {cfg.data.max_seq_len} tokens, checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}",
    ]
    for role, s in (("strong", strong), ("weak", weak)):
        lines.append(f"  {role}: {s.name}: {_count(s.params)} params (largest layer {_count(s.largest_layer_params)}),"
                     f" hidden {s.hidden}, {s.layers} layers, {s.heads}/{s.kv_heads} heads, vocab {s.vocab}")
    wmss_label = f"wmss ({cfg.mix.mode}, {cfg.mix.placement})"
    lines += ["", f"  {'GiB per GPU':40s} {'sft':>10s} {wmss_label:>28s}"]
    for key, label in COMPONENTS.items():
        if key.startswith("pool_") and cfg.mix.placement != "pool":
            continue  # no pool, no reply
        if key == "loss_chunk":
            label = f"loss [{int(phases['wmss']['loss_chunk_rows'])}, V] fp32 buffer"
        lines.append(f"  {label:40s} {phases['sft'][key] / GiB:10.2f} {phases['wmss'][key] / GiB:28.2f}")
    alt = f"  (activations with checkpointing {'off' if t.gradient_checkpointing else 'on'})"
    lines.append(f"{alt:42s} {phases['sft']['activations_alt'] / GiB:10.2f} {phases['wmss']['activations_alt'] / GiB:28.2f}")
    lines.append(f"  {'total':40s} {phases['sft']['total'] / GiB:10.2f} {phases['wmss']['total'] / GiB:28.2f}")
    val = validation_peak(cfg, strong, phases["wmss"])
    if val is not None:
        ev = cfg.evaluation
        lines += ["", f"  in-run validation of wmss tune trials (every tune.eval_every = {cfg.tune.eval_every} steps), "
                      "after a step, next to the training state:"]
        for key, label in (("weights", "evaluator's model copy (whole)"),
                           ("kv_cache", f"KV cache ({ev.batch_size} x {cfg.data.max_seq_len}+{ev.max_new_tokens} tokens)"),
                           ("prefill", "generation prefill (one layer)"),
                           ("ce_logits", f"CE logits ({int(val['ce_rows'])} x {cfg.data.max_seq_len} tokens)"),
                           ("ce_forward", "CE forward (one layer)"), ("total", "total while validating")):
            lines.append(f"  {label:40s} {'-':>10s} {val[key] / GiB:28.2f}")
    peak = max(p["total"] for p in phases.values())  # training; validation has its own verdict below
    if gpu_memory is not None:
        lines.append("")
        if peak <= gpu_memory:
            lines.append(f"fits in {gpu_memory / GiB:.1f} GiB per GPU ({(gpu_memory - peak) / GiB:.1f} GiB to spare)")
        else:
            lines.append(f"does NOT fit in {gpu_memory / GiB:.1f} GiB per GPU (short by {(peak - gpu_memory) / GiB:.1f} GiB);"
                         " to make it fit, apply in order until it does:")
            for change, after in suggestions(cfg, strong, weak, gpu_memory):
                verdict = "fits" if after <= gpu_memory else "still short"
                lines.append(f"  {change:60s} -> peak {after / GiB:7.2f} GiB ({verdict})")
    if val is not None and gpu_memory is not None:
        lines.append("")
        lines.append(f"in-run validation fits in {gpu_memory / GiB:.1f} GiB per GPU" if val["total"] <= gpu_memory else
                     f"in-run validation does NOT fit in {gpu_memory / GiB:.1f} GiB per GPU (short by "
                     f"{(val['total'] - gpu_memory) / GiB:.1f} GiB): lower evaluation.batch_size (KV cache and "
                     "prefill scale with it)")
    if cfg.mix.placement == "pool" and cfg.mix.mode == "frozen":
        lines += _pool_lines(cfg, weak, gpu_memory)
    return "\n".join(lines + _staging_lines(cfg, strong, weak, gpus_per_node))


def _staging_lines(cfg: WMSSConfig, strong: ModelShape, weak: ModelShape, gpus_per_node: int) -> list[str]:
    import tempfile

    per_node = max(1, int(gpus_per_node / (cfg.scaling.gpus_per_worker or 1.0)))
    where = cfg.training.staging_dir or f"the system temp dir, {tempfile.gettempdir()} here"
    st = {p: staging_bytes(cfg, p, strong, weak, per_node) for p in ("sft", "wmss")}
    node = f"per node ({int(st['sft']['ranks'])} ranks, --gpus-per-node {gpus_per_node})"
    lines = ["", f"local disk (training.staging_dir: {where}), checkpoint staging, GiB:",
             f"  {'per rank (rank 0)':40s} {st['sft']['rank'] / GiB:10.2f} {st['wmss']['rank'] / GiB:28.2f}",
             f"  {node:40s} {st['sft']['node'] / GiB:10.2f} {st['wmss']['node'] / GiB:28.2f}"]
    if st["sft"]["export"]:
        lines.append(f"  {'model export to object storage (rank 0)':40s} {st['sft']['export'] / GiB:10.2f} "
                     f"{st['wmss']['export'] / GiB:28.2f}")
    return lines
