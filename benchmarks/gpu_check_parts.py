"""The parts of ``benchmarks/gpu_check.py``; each takes the :class:`Setup` and returns
``(results dict, markdown lines)``. No Ray: the training rank is the project's ``PhaseWorker``."""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from gpu_check_setup import SHAPES, Setup, Variant, flops_per_token, free, make_worker, meta_model, run_config

GiB = 2**30


def _sync(s: Setup) -> None:
    if s.on_gpu:
        torch.cuda.synchronize()


def _reset_peak(s: Setup) -> None:
    if s.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(s: Setup) -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if s.on_gpu else None


def plan_gib(cfg, shape: str, phase: str) -> float:
    """``wmss plan``'s per-GPU estimate for this config and shape (the same code the CLI runs)."""
    from wmss_ray.plan import phase_bytes, shape_from_model

    m = shape_from_model(meta_model(shape), shape)
    return phase_bytes(cfg, phase, m, m)["total"] / GiB


def n_params(shape: str) -> int:
    return sum({id(p): p.numel() for p in meta_model(shape).parameters()}.values())


# ----------------------------------------------------------------------------- the step matrix


def time_worker(s: Setup, v: Variant, strong: str, weak: str, tokenized: str, shape: str, micro_batch: int,
                profile_dir: str | None) -> dict:
    """Warm-up + timed steps of one variant; tokens/s, MFU inputs, peak memory, plan estimate."""
    n_prof = 2 if v.profile and profile_dir else 0
    worker, cfg = make_worker(s, v, strong, weak, tokenized, s.warmup + s.steps + n_prof, micro_batch)
    times, losses = [], []
    for step in range(s.warmup + s.steps):
        if step == s.warmup:
            _reset_peak(s)
        t0 = time.perf_counter()
        m = worker.train_step(step)  # synchronises the device at its end
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
    peak = _peak_gib(s)
    prof = profile_steps(s, worker, s.warmup + s.steps, n_prof, profile_dir, v.label) if n_prof else None
    worker.engine.destroy()
    del worker  # engines hold reference cycles: collect only once no frame refers to them
    free()
    n = n_params(shape)
    trained, frozen = {"sft": (1, 0), "frozen": (1, 1), "joint": (2, 0)}[v.mode]
    step_s = statistics.median(times[s.warmup:])
    tokens = micro_batch * s.seq_len
    print(f"  {shape} {v.label}: step {step_s:.3f} s, {tokens / step_s:,.0f} tokens/s, peak {_gib(peak)} GiB", flush=True)
    return {"label": v.label, "mode": v.mode, "zero": v.zero_stage, "ckpt": v.checkpointing, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "flops_per_s": flops_per_token(n, shape, s.seq_len, trained, frozen)
            * tokens / step_s, "peak_gib": peak, "plan_gib": plan_gib(cfg, shape, "sft" if v.mode == "sft" else "wmss"),
            "losses": losses, "profile": prof}


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
            _reset_peak(s)
        t0 = time.perf_counter()
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # synchronises
        times.append(time.perf_counter() - t0)
    peak = _peak_gib(s)
    del model, opt, loss, batch  # the loss's graph holds every parameter
    free()
    step_s = statistics.median(times[s.warmup:])
    print(f"  plain ckpt={checkpointing}: step {step_s:.3f} s, peak {_gib(peak)} GiB", flush=True)
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
    rows = [time_worker(s, v, p["strong"], p["weak"], p["fixed"], s.shape, s.micro_batch, out_dir)
            for v in s.variants]
    peak = next((v for k, v in _peak_table().items() if k in _device_name(s)), None)
    ref = {False: plain[0], True: plain[1]}
    lines = [f"Step matrix: {s.shape}, micro-batch {s.micro_batch} x {s.seq_len} tokens (packed rows of "
             f"{s.seq_len}: no padding), world size 1, {s.steps} timed steps after {s.warmup}; MFU over "
             f"{'n/a' if not peak else f'{peak / 1e12:.0f} TFLOP/s'} (formula: gpu_check_setup.flops_per_token)", "",
             "| variant | step s | tokens/s | x plain (same ckpt) | MFU | peak GiB | wmss plan GiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in plain:
        lines.append(f"| {r['label']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | 1.00 | "
                     f"| {_gib(r['peak_gib'])} | |")
    for r in rows:
        base = ref[r["ckpt"]]
        mfu = f"{r['flops_per_s'] / peak:.1%}" if peak else "n/a"
        lines.append(f"| {r['label']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {mfu} | {_gib(r['peak_gib'])} | "
                     f"{r['plan_gib']:.1f} |")
    lines += ["", "WMSS / SFT step time (ideal: frozen 1.33, joint 2.0):", ""]
    by = {r["label"]: r for r in rows}
    for z, suffix in ((1, ""), (2, ""), (2, " ckpt"), (3, " ckpt")):
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
    return {"plain": plain, "variants": rows}, lines


# ----------------------------------------------------------------------------- exactness


def _long_logits(model, zero3: bool, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, V]`` (fp32) of one row, gathering ZeRO-3 partitions for the forward."""
    import contextlib

    import deepspeed

    ctx = deepspeed.zero.GatheredParameters(list(model.parameters())) if zero3 else contextlib.nullcontext()
    was = model.training
    model.eval()
    with torch.no_grad(), ctx:
        z = model(input_ids=ids).logits[0].float()
    model.train(was)
    return z


def part_exact(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """Joint at ZeRO-3 + checkpointing, grad_accum 2, variable-length rows: packing on vs off,
    a checkpoint at step 2 resumed in a fresh rank, the export reloaded with fp32 rotary tables."""
    from wmss_ray.models.loading import load_causal_lm

    p, n = s.paths, s.exact_steps
    half = n // 2
    ckpt_dir = os.path.join(s.root, "exact_ckpt")
    export_dir = os.path.join(s.root, "exact_export")
    long_ids = torch.randint(5, SHAPES[s.shape]["vocab_size"], (1, 2 * s.seq_len),
                             generator=torch.Generator().manual_seed(7)).to(s.device)
    losses = {}
    for packing in (True, False):
        v = Variant(f"joint z3 ckpt packing={packing}", "joint", 3, True, packing=packing)
        w, _ = make_worker(s, v, p["strong"], p["weak"], p["variable"], n, s.micro_batch, grad_accum=2)
        losses[packing] = []
        for step in range(n):
            losses[packing].append(w.train_step(step)["loss"])
            if packing and step == half - 1:
                w.save(ckpt_dir, half, half * s.micro_batch * 2)
        if packing:
            z_train = _long_logits(w.pair.strong, True, long_ids)
            w.export(export_dir)
            inv_train = {k: b.clone() for k, b in w.pair.strong.named_buffers() if "inv_freq" in k}
        w.engine.destroy()
        del w  # engines hold reference cycles: collect once no frame refers to them
        free()
    v = Variant("joint z3 ckpt resumed", "joint", 3, True)
    w, _ = make_worker(s, v, p["strong"], p["weak"], p["variable"], n, s.micro_batch, grad_accum=2)
    start = w.load(ckpt_dir)
    resumed = [w.train_step(step)["loss"] for step in range(start, n)]
    w.engine.destroy()
    del w
    free()
    reloaded = load_causal_lm(export_dir, dtype="bfloat16", device=s.device, attn_implementation="sdpa")
    z_export = _long_logits(reloaded, False, long_ids)
    inv_export = {k: b for k, b in reloaded.named_buffers() if "inv_freq" in k}
    del reloaded
    free()
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
    pack_diff = max(rel(a, b) for a, b in zip(losses[True], losses[False]))
    resume_diff = max(rel(a, b) for a, b in zip(resumed, losses[True][start:]))
    logit_diff = float(((z_train - z_export).abs().amax(-1) / z_export.abs().amax(-1)).max())
    rope_ok = all(b.dtype == torch.float32 for b in inv_train.values()) and all(
        torch.equal(inv_train[k].cpu(), inv_export[k].cpu()) for k in inv_export)
    res = {"losses_packed": losses[True], "losses_padded": losses[False], "resumed_from": start,
           "losses_resumed": resumed, "packing_max_rel": pack_diff, "resume_max_rel": resume_diff,
           "export_logit_max_rel": logit_diff, "rope_fp32_and_equal": rope_ok}
    lines = [f"Exactness ({s.shape}, joint, ZeRO-3 + checkpointing, grad_accum 2, micro-batch {s.micro_batch}, "
             f"rows of {s.seq_len // 8}-{s.seq_len} tokens, bf16):", "",
             f"- packing on vs off, {n} steps: worst relative loss difference {pack_diff:.2e}",
             f"- checkpoint after step {start}, resumed in a fresh rank: worst relative difference of steps "
             f"{start + 1}-{n} {resume_diff:.2e}",
             f"- rotary tables of the ZeRO-3 rank: fp32 and equal to the export's reload: {rope_ok}",
             f"- export reloaded vs the training rank, logits over {2 * s.seq_len} positions: worst relative "
             f"difference {logit_diff:.2e}", "",
             "| step | packed | padded | resumed |", "|---:|---:|---:|---:|"]
    for i in range(n):
        r = f"{resumed[i - start]:.5f}" if i >= start else ""
        lines.append(f"| {i + 1} | {losses[True][i]:.5f} | {losses[False][i]:.5f} | {r} |")
    return res, lines


# ----------------------------------------------------------------------------- loss kernel


def part_kernel(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """Chunked vs naive mixed CE, forward + backward, bf16 inputs, both heads trained."""
    from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB, chunk_rows_for, chunked_mixed_ce

    n, d, v = s.loss_tokens, SHAPES[s.shape]["hidden_size"], SHAPES[s.shape]["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d**-0.5,
            torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d**-0.5]
    y = torch.randint(0, v, (n,), generator=g).to(s.device)
    leaves = lambda dt: [t.to(s.device, dt).detach().clone().requires_grad_() for t in base]  # noqa: E731

    def naive(x):
        z = 0.5 * (x[0] @ x[1].T).float() + 0.5 * (x[2] @ x[3].T).float()
        return F.cross_entropy(z, y)

    ref = leaves(torch.float32)
    ref_loss = naive(ref)
    ref_loss.backward()
    ref_grads = [t.grad for t in ref]
    recipe_mb = run_config(s, s.variants[0], s.micro_batch).mix.loss_chunk_mb(s.on_gpu)
    variants = {"naive": naive}
    for mb, what in ((DEFAULT_CHUNK_MB, "default"), (recipe_mb, "recipe")):
        variants[f"chunked ({what} chunk_mb {mb:g} -> {chunk_rows_for(n, v, mb)} tokens)"] = \
            lambda x, m=mb: chunked_mixed_ce(*x, y, 0.5, chunk_size=chunk_rows_for(n, v, m))
    for chunk in s.loss_chunks:
        variants[f"chunked (chunk {chunk})"] = lambda x, c=chunk: chunked_mixed_ce(*x, y, 0.5, chunk_size=c)
    rows = []
    for name, fn in variants.items():
        x = leaves(torch.bfloat16)
        times = []
        for _ in range(4):
            for t in x:
                t.grad = None
            _reset_peak(s)
            before = torch.cuda.memory_allocated() if s.on_gpu else 0
            t0 = time.perf_counter()
            loss = fn(x)
            loss.backward()
            _sync(s)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if s.on_gpu else None
        err = max(float((t.grad.float() - r).abs().max() / r.abs().max()) for t, r in zip(x, ref_grads))
        rows.append({"impl": name, "time_ms": 1e3 * statistics.median(times[1:]), "peak_extra_mib": peak,
                     "loss_rel_err": abs(float(loss.detach()) - float(ref_loss)) / float(ref_loss), "grad_rel_err": err})
        del x, loss
    lines = [f"Mixed CE on the device, N = {n} answer tokens, D = {d}, V = {v}, bf16 inputs, joint (both heads "
             "trained); errors against an fp32 naive reference", "",
             "| impl | time ms | peak extra MiB | loss rel err | grad rel err |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['impl']} | {r['time_ms']:.1f} | {_mib(r['peak_extra_mib'])} | {r['loss_rel_err']:.2e} | "
              f"{r['grad_rel_err']:.2e} |" for r in rows]
    return {"rows": rows}, lines


# ----------------------------------------------------------------------------- scoring, generation


def part_score_gen(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """Entropy scoring (the score stage's scorer, weak + strong) and HF greedy generation."""
    from wmss_ray.models.loading import load_causal_lm
    from wmss_ray.stages.scorer import EntropyScorer
    from wmss_ray.training.dataset import RowReader

    p = s.paths
    cfg = run_config(s, s.variants[0], s.micro_batch)
    scorer = EntropyScorer(p["weak"], p["strong"], device=str(s.device), dtype="bfloat16",
                           chunk_size=cfg.scoring.chunk_size, attn_implementation="sdpa",
                           max_rows_per_forward=cfg.scoring.batch_size)
    rows = RowReader(p["fixed"]).rows(range(2 * cfg.scoring.batch_size))
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    scorer.score_rows(ids[:2], labels[:2])  # warm-up
    _sync(s)
    t0 = time.perf_counter()
    scorer.score_rows(ids, labels)
    _sync(s)
    score_s = time.perf_counter() - t0
    del scorer
    free()
    model = load_causal_lm(p["strong"], dtype="bfloat16", device=s.device, attn_implementation="sdpa").eval()
    prompt = torch.randint(5, SHAPES[s.shape]["vocab_size"], (s.gen_batch, 96),
                           generator=torch.Generator().manual_seed(3)).to(s.device)
    gen = dict(max_new_tokens=s.gen_new_tokens, min_new_tokens=s.gen_new_tokens, do_sample=False, use_cache=True,
               pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=prompt[:2], **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
        _sync(s)
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen)
        _sync(s)
    gen_s = time.perf_counter() - t0
    new = (out.shape[1] - prompt.shape[1]) * s.gen_batch
    del model
    free()
    res = {"score_rows_per_s": len(rows) / score_s, "score_tokens_per_s": len(rows) * s.seq_len / score_s,
           "gen_completions_per_s": s.gen_batch / gen_s, "gen_new_tokens_per_s": new / gen_s}
    lines = [f"Scoring (stages.scorer.EntropyScorer, weak + strong forward, bf16, {len(rows)} rows of {s.seq_len} "
             f"tokens, {cfg.scoring.batch_size} rows per forward): {res['score_rows_per_s']:,.1f} rows/s, "
             f"{res['score_tokens_per_s']:,.0f} tokens/s",
             f"Generation (HF generate, greedy, batch {s.gen_batch}, 96-token prompts, {s.gen_new_tokens} new tokens): "
             f"{res['gen_completions_per_s']:,.1f} completions/s, {res['gen_new_tokens_per_s']:,.0f} new tokens/s"]
    return res, lines


# ----------------------------------------------------------------------------- the large shape


def part_big(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """The 4B shape: plain SFT with checkpointing beside ours (ZeRO-2 / ZeRO-3 + checkpointing),
    WMSS frozen; peak memory next to ``wmss plan``."""
    from gpu_check_setup import save_model

    big = s.paths.get("big") or save_model(s.big_shape, 1, os.path.join(s.root, "big"), s.device)
    s.paths["big"] = big
    mb = s.big_micro_batch
    plain = plain_sft(s, big, s.paths["fixed"], mb, True)
    rows = [time_worker(s, v, big, big, s.paths["fixed"], s.big_shape, mb, None) for v in s.big_variants]
    peak = next((v for k, v in _peak_table().items() if k in _device_name(s)), None)
    lines = [f"{s.big_shape}: micro-batch {mb} x {s.seq_len}, world size 1", "",
             "| variant | step s | tokens/s | x plain ckpt | MFU | peak GiB | wmss plan GiB |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| {plain['label']} | {plain['step_s']:.3f} | {plain['tokens_per_s']:,.0f} | 1.00 | | "
             f"{_gib(plain['peak_gib'])} | |"]
    for r in rows:
        mfu = f"{r['flops_per_s'] / peak:.1%}" if peak else "n/a"
        lines.append(f"| {r['label']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f} | {mfu} | {_gib(r['peak_gib'])} | "
                     f"{r['plan_gib']:.1f} |")
    return {"plain": plain, "variants": rows}, lines


def part_nccl(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    n = torch.cuda.device_count() if s.on_gpu else 0
    if n < 2:
        return {"skipped": True}, [f"NCCL with 2 ranks: skipped ({n} GPU{'s' if n != 1 else ''} on this machine)."]
    raise NotImplementedError("2-GPU NCCL part: not written yet (no 2-GPU machine to try it on)")


def part_ray(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": True}, ["Ray Train path: not run (Ray is not installed on this machine; the CPU suite "
                                   "runs the same PhaseWorker through Ray Train)."]
    return {"skipped": True}, ["Ray Train path: not run by this script yet (it drives PhaseWorker directly)."]


def _peak_table() -> dict[str, float]:
    from gpu_check_setup import PEAK_BF16

    return PEAK_BF16


def _device_name(s: Setup) -> str:
    return torch.cuda.get_device_name() if s.on_gpu else "CPU"


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


PARTS = {"steps": part_steps, "exact": part_exact, "kernel": part_kernel, "score_gen": part_score_gen,
         "big": part_big, "nccl": part_nccl, "ray": part_ray}
