"""The step matrix of ``benchmarks/gpu_check.py``: the project's training rank (``PhaseWorker``)
beside a plain PyTorch step, at the end-to-end shape and at the large one, with a profile; and the
measuring helpers the other parts share."""

from __future__ import annotations

import os
import statistics
import time

import torch

from gpu_check_setup import Setup, Variant, flops_per_token, free, make_worker, meta_model, run_config

GiB = 2**30


def sync(s: Setup) -> None:
    if s.on_gpu:
        torch.cuda.synchronize()


def reset_peak(s: Setup) -> None:
    if s.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def max_rel(xs: list[float], refs: list[float]) -> float:
    """The worst relative difference of per-step figures (losses, gradient norms) to a reference's."""
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(xs, refs))


def peak_gib(s: Setup) -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if s.on_gpu else None


def plan_gib(cfg, shape: str, phase: str) -> float:
    """``wmss plan``'s per-GPU estimate for this config and shape (the same code the CLI runs)."""
    from wmss_ray.plan import phase_bytes, shape_from_model

    m = shape_from_model(meta_model(shape), shape)
    return phase_bytes(cfg, phase, m, m)["total"] / GiB


def n_params(shape: str) -> int:
    return sum({id(p): p.numel() for p in meta_model(shape).parameters()}.values())


def peak_table() -> dict[str, float]:
    from gpu_check_setup import PEAK_BF16

    return PEAK_BF16


def device_name(s: Setup) -> str:
    return torch.cuda.get_device_name() if s.on_gpu else "CPU"


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


# ----------------------------------------------------------------------------- the step matrix


def time_worker(s: Setup, v: Variant, strong: str, weak: str, tokenized: str, shape: str, micro_batch: int,
                profile_dir: str | None) -> dict:
    """Warm-up + timed steps of one variant; tokens/s, MFU inputs, peak memory, plan estimate."""
    n_prof = 2 if v.profile and profile_dir else 0
    worker, cfg = make_worker(s, v, strong, weak, tokenized, s.warmup + s.steps + n_prof, micro_batch)
    times, losses = [], []
    for step in range(s.warmup + s.steps):
        if step == s.warmup:
            reset_peak(s)
        t0 = time.perf_counter()
        m = worker.train_step(step)  # synchronises the device at its end
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
    peak = peak_gib(s)
    prof = profile_steps(s, worker, s.warmup + s.steps, n_prof, profile_dir, v.label) if n_prof else None
    optimizer = type(worker.engine.optimizer).__name__  # which DeepSpeed wrapper the knobs chose
    worker.engine.destroy()
    del worker  # engines hold reference cycles: collect only once no frame refers to them
    free()
    n = n_params(shape)
    trained, frozen = {"sft": (1, 0), "frozen": (1, 1), "joint": (2, 0)}[v.mode]
    step_s = statistics.median(times[s.warmup:])
    tokens = micro_batch * s.seq_len
    print(f"  {shape} {v.label}: step {step_s:.3f} s, {tokens / step_s:,.0f} tokens/s, peak {gib(peak)} GiB", flush=True)
    return {"label": v.label, "mode": v.mode, "zero": v.zero_stage, "ckpt": v.checkpointing, "packing": v.packing,
            "ds": list(v.ds), "attn": v.attn, "knob": v.knob, "optimizer": optimizer, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "flops_per_s": flops_per_token(n, shape, s.seq_len, trained, frozen)
            * tokens / step_s, "peak_gib": peak, "plan_gib": plan_gib(cfg, shape, "sft" if v.mode == "sft" else "wmss"),
            "losses": losses, "profile": prof}


def time_or_oom(s: Setup, v: Variant, strong: str, weak: str, tokenized: str, shape: str, micro_batch: int,
                profile_dir: str | None) -> dict:
    """:func:`time_worker`, or, where the variant does not fit the device, a row that says so
    (``oom``: the error's first line, beside ``wmss plan``'s estimate and the device's memory) and
    the memory given back: the next variants still run (an 80 GB card does not hold every variant
    of the 4B shape that a 141 GB one does; one that does not fit must not cost the rest)."""
    try:
        return time_worker(s, v, strong, weak, tokenized, shape, micro_batch, profile_dir)
    except torch.cuda.OutOfMemoryError as err:
        oom = str(err).strip().splitlines()[0][:200]
    forget_engines()
    free()
    cfg = run_config(s, v, micro_batch)
    total = torch.cuda.get_device_properties(0).total_memory / GiB if s.on_gpu else None
    print(f"  {shape} {v.label}: out of memory ({oom})", flush=True)
    return {"label": v.label, "mode": v.mode, "zero": v.zero_stage, "ckpt": v.checkpointing, "oom": oom,
            "device_gib": total, "plan_gib": plan_gib(cfg, shape, "sft" if v.mode == "sft" else "wmss")}


def forget_engines() -> None:
    """Drop what DeepSpeed keeps of an engine that died mid-step (ZeRO-3's module stack), so that
    collecting frees its memory."""
    import sys

    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()


def oom_lines(rows: list[dict], columns: int) -> list[str]:
    """Table rows for the variants that did not fit (``columns``: the table's column count)."""
    return [f"| {r['label']} | out of memory: {r['device_gib'] or 0:.1f} GiB device, wmss plan {r['plan_gib']:.1f} GiB"
            + " |" * (columns - 1) for r in rows]


def knob_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """Each knob variant (DeepSpeed overrides, another attention kernel) with the shipped variant it
    changes (same mode, stage, checkpointing, packing), when both ran; sets ``loss_vs_base`` on the
    knob row: the worst relative difference of their per-step losses (same initial weights, same
    rows: what the knob costs in numerics, the evidence a default needs besides speed)."""
    pairs = []
    for r in rows:
        base = next((b for b in rows if r["knob"] and not b["knob"] and
                     (b["mode"], b["zero"], b["ckpt"], b["packing"]) == (r["mode"], r["zero"], r["ckpt"], r["packing"])),
                    None)
        if base is not None:
            r["loss_vs_base"] = max_rel(r["losses"], base["losses"])
            pairs.append((r, base))
    return pairs


def plain_sft(s: Setup, model_dir: str, tokenized: str, micro_batch: int, checkpointing: bool) -> dict:
    """The reference a user would write: HF model with its own loss, fp32 master weights under
    bf16 autocast, fused AdamW (on GPU), grad clip 1.0, same rows and batch, no DeepSpeed."""
    from transformers import AutoModelForCausalLM

    from wmss_ray.data.chat_tokens import collate
    from wmss_ray.training.dataset import RowReader

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(s.device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **({"fused": True} if s.on_gpu else {}))
    reader = RowReader(tokenized)
    times, losses = [], []
    for step in range(s.warmup + s.steps):
        batch = collate(reader.rows(range(step * micro_batch, (step + 1) * micro_batch)), 0)
        batch = {k: v.to(s.device) for k, v in batch.items()}
        if step == s.warmup:
            reset_peak(s)
        t0 = time.perf_counter()
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # synchronises
        times.append(time.perf_counter() - t0)
    peak = peak_gib(s)
    del model, opt, loss, batch  # the loss's graph holds every parameter
    free()
    step_s = statistics.median(times[s.warmup:])
    print(f"  plain ckpt={checkpointing}: step {step_s:.3f} s, peak {gib(peak)} GiB", flush=True)
    return {"label": f"plain PyTorch SFT{' ckpt' if checkpointing else ''}", "step_s": step_s,
            "tokens_per_s": micro_batch * s.seq_len / step_s, "peak_gib": peak, "losses": losses}


def profile_steps(s: Setup, worker, first: int, n: int, out_dir: str, label: str) -> dict:
    """``n`` steps under torch.profiler: where the time goes, GPU busy share, host syncs."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.on_gpu else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for k in range(n):
            worker.train_step(first + k)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    key = "self_device_time_total" if s.on_gpu else "self_cpu_time_total"
    # kernels only: an op's own "self device time" is its kernels' again (the table double counts)
    busy_us = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) \
        if s.on_gpu else None
    syncs = {name: sum(e.count for e in ka if e.key == name) // max(n, 1)
             for name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                          "aten::item", "cudaMemcpyAsync")}
    table = ka.table(sort_by=key, row_limit=25)
    name = "profile_" + "".join(c if c.isalnum() else "_" for c in label).strip("_") + ".txt"
    with open(os.path.join(out_dir, name), "w") as f:
        f.write(table)
    top = sorted(ka, key=lambda e: getattr(e, key, 0.0), reverse=True)[:8]
    return {"wall_s_per_step": wall / n, "gpu_busy_s_per_step": None if busy_us is None else busy_us / 1e6 / n,
            "syncs_per_step": syncs, "file": name,
            "top": [(e.key[:60], getattr(e, key, 0.0) / 1e3 / n) for e in top]}


def part_steps(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """SFT / WMSS step matrix at the end-to-end shape, the plain reference beside it."""
    p = s.paths
    plain = [plain_sft(s, p["strong"], p["fixed"], s.micro_batch, ckpt) for ckpt in (False, True)]
    runnable, skipped = split_runnable(s, s.variants)
    timed = [time_or_oom(s, v, p["strong"], p["weak"], p["fixed"], s.shape, s.micro_batch, out_dir)
             for v in runnable]
    rows, ooms = [r for r in timed if "oom" not in r], [r for r in timed if "oom" in r]
    peak = next((v for k, v in peak_table().items() if k in device_name(s)), None)
    ref = {False: plain[0], True: plain[1]}
    lines = [f"Step matrix: {s.shape}, micro-batch {s.micro_batch} x {s.seq_len} tokens (packed rows of "
             f"{s.seq_len}: no padding), world size 1, {s.steps} timed steps after {s.warmup}; MFU over "
             f"{'n/a' if not peak else f'{peak / 1e12:.0f} TFLOP/s'} (formula: gpu_check_setup.flops_per_token)", "",
             "| variant | step s | tokens/s | x plain (same ckpt) | MFU | peak GiB | wmss plan GiB | optimizer |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in plain:
        lines.append(f"| {r['label']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | 1.00 | "
                     f"| {gib(r['peak_gib'])} | | AdamW |")
    for r in rows:
        base = ref[r["ckpt"]]
        mfu = f"{r['flops_per_s'] / peak:.1%}" if peak else "n/a"
        lines.append(f"| {r['label']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {mfu} | {gib(r['peak_gib'])} | "
                     f"{r['plan_gib']:.1f} | {r['optimizer']} |")
    lines += oom_lines(ooms, 8)
    lines += [f"| {v.label} | skipped: {why} | | | | | | |" for v, why in skipped]
    knobs = [f"`{kv}`" for kv in dict.fromkeys(kv for r in rows for kv in r["ds"])]
    if knobs:
        lines += ["", "DeepSpeed overrides of the knob variants (`training.ds_config_overrides`): " + ", ".join(knobs)]
    for r, base in knob_pairs(rows):
        lines.append(f"- {r['label']} against {base['label']}: step time x{r['step_s'] / base['step_s']:.2f}, "
                     f"worst relative loss difference {r['loss_vs_base']:.1e} over {len(r['losses'])} steps")
    lines += ["", "WMSS / SFT step time (ideal: frozen 1.33, joint 2.0):", ""]
    by = {r["label"]: r for r in rows}
    for z, suffix in ((1, ""), (2, ""), (2, " ckpt"), (3, " ckpt"), (2, " autocast")):
        sft = by.get(f"sft z{z}{suffix}")
        for mode in ("frozen", "joint"):
            r = by.get(f"{mode} z{z}{suffix}")
            if sft and r:
                lines.append(f"- ZeRO-{z}{suffix}: {mode}/SFT = {r['step_s'] / sft['step_s']:.2f}")
    for r in rows:
        if r["profile"]:
            pr = r["profile"]
            busy = pr["gpu_busy_s_per_step"]
            lines += ["", f"Profile of `{r['label']}` ({pr['file']}): {pr['wall_s_per_step']:.3f} s per step wall"
                      + ("" if busy is None else f", GPU kernels {busy:.3f} s ({busy / pr['wall_s_per_step']:.0%})")
                      + f"; host syncs per step {pr['syncs_per_step']}", "",
                      "| op | ms per step |", "|---|---:|"]
            lines += [f"| `{k}` | {ms:.1f} |" for k, ms in pr["top"]]
    return {"plain": plain, "variants": rows, "skipped": {v.label: why for v, why in skipped},
            "out_of_memory": ooms}, lines


def split_runnable(s: Setup, variants: list[Variant]) -> tuple[list[Variant], list[tuple[Variant, str]]]:
    """The variants this machine can run, and the others with the reason (a kernel not installed:
    the project's own check, ``models.loading.resolve_attn_implementation``, which never falls back)."""
    from wmss_ray.models.loading import resolve_attn_implementation

    runnable, skipped = [], []
    for v in variants:
        try:
            resolve_attn_implementation(v.attn, s.device)
            runnable.append(v)
        except (ImportError, ValueError) as err:
            skipped.append((v, str(err)))
    return runnable, skipped


# ----------------------------------------------------------------------------- the large shape


def part_big(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """The 4B shape: plain SFT with checkpointing beside ours (ZeRO-2 / ZeRO-3 + checkpointing),
    WMSS frozen; peak memory next to ``wmss plan``."""
    from gpu_check_setup import save_model

    big = s.paths.get("big") or save_model(s.big_shape, 1, os.path.join(s.root, "big"), s.device)
    s.paths["big"] = big
    mb = s.big_micro_batch
    plain = plain_sft(s, big, s.paths["fixed"], mb, True)
    timed = [time_or_oom(s, v, big, big, s.paths["fixed"], s.big_shape, mb, None) for v in s.big_variants]
    rows, ooms = [r for r in timed if "oom" not in r], [r for r in timed if "oom" in r]
    peak = next((v for k, v in peak_table().items() if k in device_name(s)), None)
    lines = [f"{s.big_shape}: micro-batch {mb} x {s.seq_len}, world size 1", "",
             "| variant | step s | tokens/s | x plain ckpt | MFU | peak GiB | wmss plan GiB |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| {plain['label']} | {plain['step_s']:.3f} | {plain['tokens_per_s']:,.0f} | 1.00 | | "
             f"{gib(plain['peak_gib'])} | |"]
    for r in rows:
        mfu = f"{r['flops_per_s'] / peak:.1%}" if peak else "n/a"
        lines.append(f"| {r['label']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f} | {mfu} | {gib(r['peak_gib'])} | "
                     f"{r['plan_gib']:.1f} |")
    lines += oom_lines(ooms, 7)
    return {"plain": plain, "variants": rows, "out_of_memory": ooms}, lines
