"""The parts of ``benchmarks/gpu_check.py`` besides the step matrix (``gpu_check_steps.py``); each takes the :class:`Setup` and returns
``(results dict, markdown lines)``. No Ray: the training rank is the project's ``PhaseWorker``."""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from gpu_check_setup import SHAPES, Setup, Variant, free, make_worker, run_config
from gpu_check_ranks import part_ranks
from gpu_check_steps import max_rel, mib, reset_peak, sync, part_big, part_steps

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
    pack_diff = max_rel(losses[True], losses[False])
    resume_diff = max_rel(resumed, losses[True][start:])
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
            reset_peak(s)
            before = torch.cuda.memory_allocated() if s.on_gpu else 0
            t0 = time.perf_counter()
            loss = fn(x)
            loss.backward()
            sync(s)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if s.on_gpu else None
        err = max(float((t.grad.float() - r).abs().max() / r.abs().max()) for t, r in zip(x, ref_grads))
        rows.append({"impl": name, "time_ms": 1e3 * statistics.median(times[1:]), "peak_extra_mib": peak,
                     "loss_rel_err": abs(float(loss.detach()) - float(ref_loss)) / float(ref_loss), "grad_rel_err": err})
        del x, loss
    lines = [f"Mixed CE on the device, N = {n} answer tokens, D = {d}, V = {v}, bf16 inputs, joint (both heads "
             "trained); errors against an fp32 naive reference", "",
             "| impl | time ms | peak extra MiB | loss rel err | grad rel err |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['impl']} | {r['time_ms']:.1f} | {mib(r['peak_extra_mib'])} | {r['loss_rel_err']:.2e} | "
              f"{r['grad_rel_err']:.2e} |" for r in rows]
    return {"rows": rows}, lines


# ----------------------------------------------------------------------------- scoring, generation


def part_attention(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """One attention layer on packed rows at the check's shape: sdpa's block mask (what packing runs
    under sdpa) against the varlen kernels (flash-attn where installed, PyTorch's own) and flex
    attention, with their differences (``benchmarks/packed_attention.py``)."""
    from packed_attention import measure, table

    c = SHAPES[s.shape]
    summary = measure(rows=s.micro_batch, seq=s.seq_len, heads=c["num_attention_heads"],
                      kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"], doc_min=max(4, s.seq_len // 20),
                      doc_max=s.seq_len, device=s.device, iters=10 if s.on_gpu else 2)
    return summary, table(summary)


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
    sync(s)
    t0 = time.perf_counter()
    scorer.score_rows(ids, labels)
    sync(s)
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
        sync(s)
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen)
        sync(s)
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


def part_engines(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """HF ``generate`` against vLLM on the same model, prompts and settings (``benchmarks/generation.py``:
    chat-rendered prompts, greedy, exactly ``gen_new_tokens`` new tokens each, each engine in a fresh
    process), at the end-to-end shape and, on a GPU, the large one: the evaluation engines' speed
    where users run them. Skipped, and said, where vLLM is not installed."""
    from generation import child_run, summarise
    from gpu_check_setup import save_model
    from gpu_check_steps import n_params

    from wmss_ray.models.vllm_engine import vllm_installed

    if not vllm_installed():
        return {"skipped": True}, ["HF generate vs vLLM: skipped (vLLM is not installed in this environment; the "
                                   "project's GPU image installs it, `benchmarks/generation.py --device cuda` runs it "
                                   "alone)."]
    device = "cuda" if s.on_gpu else "cpu"
    shapes = [(s.shape, s.paths["strong"])]
    if s.on_gpu:  # the CPU smoke checks the path at one shape
        s.paths["big"] = s.paths.get("big") or save_model(s.big_shape, 1, os.path.join(s.root, "big"), s.device)
        shapes.append((s.big_shape, s.paths["big"]))
    n = 2 * s.gen_batch
    util = 0.85
    if s.on_gpu:  # what this process still holds (DeepSpeed keeps ZeRO-3 modules) is not vLLM's to take
        free_b, total_b = torch.cuda.mem_get_info()
        util = round(min(0.85, 0.9 * free_b / total_b), 3)
    memory = f"vLLM gpu_memory_utilization {util}" if s.on_gpu else "vLLM KV cache 1 GiB"
    rows, lines = [], [f"HF generate vs vLLM ({device}, each engine in a fresh process, greedy, {n} chat prompts x "
                       f"{s.gen_new_tokens} new tokens, HF batch {s.gen_batch}, {memory}):",
                       "", "| shape | engine | start s | completions/s | new tokens/s | vLLM / HF (steady) |",
                       "|---|---|---:|---:|---:|---:|"]
    for shape, model_dir in shapes:
        runs = [child_run(e, model_dir, n, s.gen_new_tokens, s.gen_batch, device, util) for e in ("hf", "vllm")]
        summary = summarise(shape, n_params(shape), runs)
        summary["new_tokens"] = {r["engine"]: r["new_tokens"] for r in runs}
        rows.append(summary)
        ratio = summary["ratio_vllm_over_hf"]["steady_completions_per_s"]
        for e in ("hf", "vllm"):
            r = summary[e]
            lines.append(f"| {shape} | {e} | {r['start_s']:.1f} | {r['steady_completions_per_s']:,.1f} | "
                         f"{r['steady_new_tokens_per_s']:,.0f} | {f'{ratio:.1f}x' if e == 'vllm' else ''} |")
    lines += ["", "Goal at the large shape on a GPU (issue 27): vLLM >= 10x HF's completions per second."]
    return {"rows": rows, "gpu_memory_utilization": util}, lines


def part_ray(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": True}, ["Ray Train path: not run (Ray is not installed on this machine; the CPU suite "
                                   "runs this part through Ray Train: tests/test_gpu_check.py)."]
    from gpu_check_ray import part_ray as ray_part

    return ray_part(s, out_dir)


PARTS = {"steps": part_steps, "exact": part_exact, "kernel": part_kernel, "big": part_big,
         "attention": part_attention, "score_gen": part_score_gen, "nccl": part_ranks, "ray": part_ray,
         "engines": part_engines}
