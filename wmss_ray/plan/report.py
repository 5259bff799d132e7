"""The ``wmss plan`` report: the per-GPU table of :mod:`wmss_ray.plan.memory`'s figures, what to
change until a config fits (:func:`suggestions`), the weak pool's and the local disk's lines."""

from __future__ import annotations

import re

from wmss_ray.config.loading import config_from_dict
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.plan.memory import (
    COMPONENTS,
    GiB,
    is_half,
    lora_params,
    phase_bytes,
    pool_actor_bytes,
    shares_base,
    staging_bytes,
    validation_peak,
)
from wmss_ray.plan.shapes import ModelShape, model_shape
from wmss_ray.weak_pool.server import pool_dtype


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


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
    return lines + shard_advice(cfg, weak, gpu_memory)


def shard_advice(cfg: WMSSConfig, weak: ModelShape, gpu_memory: float | None) -> list[str]:
    """A warning line when ``mix.pool.shards`` S > 1 on GPU actors although one whole copy of the
    weak model (an S = 1 actor) fits in ``gpu_memory``: R x S shards serve the rows of R x S
    single-copy replicas, but every shard's forward all-gathers every layer from the other S - 1,
    which the replicas never do. Shards are for a weak model that does not fit one GPU."""
    p = cfg.mix.pool
    if p.shards < 2 or p.gpus_per_actor <= 0 or gpu_memory is None:
        return []
    sharing = int(1 / p.gpus_per_actor + 1e-9) if p.gpus_per_actor < 1 else 1  # actors on one GPU
    whole = pool_actor_bytes(_with(cfg, ["mix.pool.shards=1"]), weak)["total"] * sharing
    if whole > gpu_memory:
        return []
    return [f"  warning: one copy of the weak model fits on one GPU ({whole / GiB:.2f} GiB at mix.pool.shards=1): "
            f"--set mix.pool.replicas={p.replicas * p.shards} --set mix.pool.shards=1 serves the same rows on the "
            "same GPUs without ZeRO-3 gathers between them; shards are for a weak model that does not fit one GPU"]


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
    # changes the method in joint mode (the weak model stops training); a control's fake weak side
    # (mix.weak_source) is colocated only, and uniform's holds no weak model to move
    if cfg.mix.placement == "colocated" and cfg.mix.weak_source == "model":
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
    prec = "fp32 weights under bf16 autocast" if t.autocast else prec
    offload = [n for n, on in (("optimizer", t.offload_optimizer), ("params", t.offload_params)) if on]
    lines = [] if cfg.scaling.use_gpu else ["note: scaling.use_gpu is false; the figures are per rank as if on GPUs"]
    lines += [
        f"wmss plan {source}: memory per GPU, {cfg.scaling.num_workers} data-parallel ranks, {prec}, "
        f"ZeRO-{t.zero_stage}{' offload ' + '+'.join(offload) if offload else ''}, micro batch "
        f"{t.micro_batch_size} x {cfg.data.max_seq_len} tokens, checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}",
    ]
    for role, s in (("strong", strong), ("weak", weak)):
        if role == "weak" and cfg.mix.weak_source == "uniform":
            lines.append("  weak: none loaded in wmss (mix.weak_source: uniform, 1/V for every token)")
            continue
        lines.append(f"  {role}: {s.name}: {_count(s.params)} params (largest layer {_count(s.largest_layer_params)}),"
                     f" hidden {s.hidden}, {s.layers} layers, {s.heads}/{s.kv_heads} heads, vocab {s.vocab}")
    if t.lora.enabled:
        weak_side = ("the strong model's base with the adapter off (no copy of its own)" if shares_base(cfg)
                     else "its own copy (not the strong model's base)")
        lines.append(f"  lora: r {t.lora.r}, alpha {t.lora.lora_alpha:g}: {_count(lora_params(strong, t.lora))} adapter "
                     f"params trained (base frozen); weak model: {weak_side}")
    wmss_label = f"wmss ({cfg.mix.mode}, {cfg.mix.placement})"
    lines += ["", f"  {'GiB per GPU':40s} {'sft':>10s} {wmss_label:>28s}"]
    for key, label in COMPONENTS.items():
        if key.startswith("pool_") and cfg.mix.placement != "pool" or key == "autocast_casts" and not t.autocast:
            continue  # no pool, no reply; no autocast, no casts
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
