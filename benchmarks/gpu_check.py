"""GPU check of the training path at a real model shape, on one GPU (< 8 minutes on an H100/H200).

What it runs, single process (world size 1, a local torch.distributed group, DeepSpeed ZeRO-3):

1. A random-init model with Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 heads, 8 kv heads,
   head_dim 128, intermediate 3072, vocab 151,936, tied embeddings; ~0.6 B parameters), and a
   second one (another seed) as the weak model.
2. SFT, WMSS frozen and WMSS joint optimizer steps in bf16 at ZeRO-3 with gradient
   checkpointing (and ``training.packing`` when this build has it), through the project's own
   ``PairLM`` + ``build_ds_config`` + ``init_engine``: tokens/s, MFU, peak GPU memory.
   MFU = model FLOPs / s over the GPU's dense bf16 peak, model FLOPs per token = 6 x trained
   parameters + 2 x frozen (forward-only) parameters (the usual convention: attention's
   ``s^2`` FLOPs and the checkpointing recompute are not counted).
3. Loss agreement: the joint steps again in fp32 (same init, same batches); per-step relative
   difference of the bf16 losses from the fp32 ones.
4. The chunked mixed CE against the naive full-logit loss on the GPU (bf16 inputs): time, peak
   memory above the inputs, and error against an fp32 naive reference, at the default
   ``mix.chunk_mb`` budget and at explicit chunks.

Usage::

    python benchmarks/gpu_check.py --out benchmarks/results_gpu_check.md   # on a GPU
    python benchmarks/gpu_check.py --cpu-smoke                             # tiny shape on CPU (a test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wmss_ray.config.schema import TrainingConfig  # noqa: E402
from wmss_ray.config.loading import config_from_dict
from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB, chunk_rows_for, chunked_mixed_ce  # noqa: E402

#: Dense bf16 peak FLOP/s by device-name substring (H200 = H100 SXM's tensor cores).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True)
IGN = -100


def build_model(shape: dict, seed: int, dtype: torch.dtype, device: torch.device, attn: str):
    """A random-init Qwen3 causal LM of ``shape``, seeded (same seed -> same weights), on ``device``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, max_position_embeddings=40960, rope_parameters={"rope_type": "default",
                         "rope_theta": 1e6}, attn_implementation=attn, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)  # fp32 init, then cast: bf16 and fp32 runs share weights
    return model.to(dtype)


def make_batches(n: int, micro_batch: int, seq_len: int, vocab: int, device) -> list[dict]:
    """``n`` fixed micro-batches of random tokens; the first quarter of each row is the prompt."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : seq_len // 4] = IGN
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


def training_config(a, mode: str, dtype: torch.dtype):
    """The run config of one phase; ``training.packing`` is set when this build has the knob."""
    training = {"zero_stage": 3, "gradient_checkpointing": True, "micro_batch_size": a.micro_batch,
                "grad_accum": 1, "lr": a.lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "grad_clip": 1.0}
    if "packing" in TrainingConfig.model_fields:
        training["packing"] = True
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    return config_from_dict({"training": training, "mix": {"lam": 0.5, "mode": "frozen" if mode == "frozen" else "joint"},
                             "models": {"dtype": dtype_name}, "scaling": {"use_gpu": a.device.type == "cuda"}})


def run_phase(a, mode: str, dtype: torch.dtype, steps: int) -> dict:
    """Warm-up + ``steps`` optimizer steps of ``mode`` ("sft" | "frozen" | "joint")."""
    from wmss_ray.training.ds_config import init_engine, param_groups
    from wmss_ray.training.pair import PairLM

    cfg = training_config(a, mode, dtype)
    strong = build_model(a.shape, 1, dtype, a.device, a.attn)
    weak = build_model(a.shape, 2, dtype, a.device, a.attn) if mode != "sft" else None
    for m in (strong, weak):
        if m is not None:
            PairLM.prepare_for_training(m, cfg.training.gradient_checkpointing)
    n_strong = sum(p.numel() for p in strong.parameters())
    n_weak = sum(p.numel() for p in weak.parameters()) if weak is not None else 0
    pair = PairLM(strong, weak, mode, cfg.mix.lam, zero3=True, chunk_mb=cfg.mix.chunk_mb)
    groups = param_groups(pair.trainable_groups(cfg.training.lr, None), cfg.training.weight_decay)
    engine = init_engine(pair, groups, cfg.training, 1, a.warmup + steps, dtype, a.device.type == "cuda")
    batches = make_batches(a.n_batches, a.micro_batch, a.seq_len, a.shape["vocab_size"], a.device)
    if a.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step in range(a.warmup + steps):
        b = batches[step % len(batches)]
        t0 = time.perf_counter()
        n_answer = float((b["labels"][:, 1:] != IGN).sum())
        loss, _ = engine(b["input_ids"], b["attention_mask"], b["labels"], num_tokens=n_answer)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))  # syncs the device
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if a.device.type == "cuda" else None
    step_s = statistics.median(times[a.warmup:] or times)
    tokens = a.micro_batch * a.seq_len
    flops_per_token = 6 * n_strong + (6 if mode == "joint" else 2) * n_weak
    engine.destroy()
    del engine, pair, strong, weak
    if a.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"mode": mode, "dtype": str(dtype).replace("torch.", ""), "params_strong": n_strong, "params_weak": n_weak,
            "step_s": step_s, "tokens_per_s": tokens / step_s, "model_flops_per_s": flops_per_token * tokens / step_s,
            "peak_gib": None if peak is None else peak / 2**30, "losses": losses}


def loss_kernel_check(a) -> list[dict]:
    """Chunked vs naive mixed CE, forward + backward, bf16 inputs, both heads trained."""
    n, d, v = a.loss_tokens, a.shape["hidden_size"], a.shape["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d**-0.5,
            torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d**-0.5]
    y = torch.randint(0, v, (n,), generator=g).to(a.device)

    def leaves(dtype):
        return [t.to(a.device, dtype).detach().clone().requires_grad_() for t in base]  # fresh leaves

    def naive(x):
        z = 0.5 * (x[0] @ x[1].T).float() + 0.5 * (x[2] @ x[3].T).float()
        return F.cross_entropy(z, y)

    ref = leaves(torch.float32)
    ref_loss = naive(ref)
    ref_loss.backward()
    ref_loss = ref_loss.detach()
    ref_grads = [t.grad for t in ref]
    variants = {"naive": naive, f"chunked (chunk_mb {DEFAULT_CHUNK_MB:g} -> {chunk_rows_for(n, v, DEFAULT_CHUNK_MB)} tokens)":
                lambda x: chunked_mixed_ce(*x, y, 0.5)}
    for chunk in a.loss_chunks:
        variants[f"chunked (chunk {chunk})"] = lambda x, c=chunk: chunked_mixed_ce(*x, y, 0.5, chunk_size=c)
    rows = []
    for name, fn in variants.items():
        x = leaves(torch.bfloat16)
        times = []
        for rep in range(1 + a.loss_reps):
            for t in x:
                t.grad = None
            if a.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            loss = fn(x)
            loss.backward()
            if a.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if a.device.type == "cuda" else None
        err = max(float((t.grad.float() - r).abs().max() / r.abs().max()) for t, r in zip(x, ref_grads))
        rows.append({"impl": name, "time_ms": 1e3 * statistics.median(times[1:]), "peak_extra_mib": peak,
                     "loss_rel_err": abs(float(loss.detach()) - float(ref_loss)) / float(ref_loss), "grad_rel_err": err})
        del x, loss
    return rows


def report(a, phases: list[dict], fp32: dict, kernel: list[dict]) -> str:
    name = torch.cuda.get_device_name() if a.device.type == "cuda" else "CPU (smoke run: figures mean nothing)"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    lines = [f"Device: {name}; torch {torch.__version__}; attention {a.attn}; micro batch {a.micro_batch} x "
             f"{a.seq_len} tokens; ZeRO-3, gradient checkpointing, world size 1; packing "
             f"{'on' if 'packing' in TrainingConfig.model_fields else 'not in this build (skipped)'}", "",
             "| phase | dtype | params trained (+frozen) | step s | tokens/s | MFU | peak GiB |", "|---|---|---|---:|---:|---:|---:|"]
    for r in phases:
        mfu = f"{r['model_flops_per_s'] / peak:.1%}" if peak else "n/a"
        trained = r["params_strong"] + (r["params_weak"] if r["mode"] == "joint" else 0)
        frozen = r["params_weak"] if r["mode"] == "frozen" else 0
        pk = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['mode']} | {r['dtype']} | {trained / 1e6:,.1f} M (+{frozen / 1e6:,.1f} M) | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | {pk} |")
    bf16 = next(r for r in phases if r["mode"] == "joint")
    k = len(fp32["losses"])
    rel = [abs(b - f) / abs(f) for b, f in zip(bf16["losses"][:k], fp32["losses"])]
    lines += ["", f"Loss agreement, joint, bf16 vs fp32, {k} steps: max relative difference {max(rel):.2e}",
              "", "| step | bf16 loss | fp32 loss | rel. diff |", "|---:|---:|---:|---:|"]
    lines += [f"| {i} | {b:.5f} | {f:.5f} | {r:.2e} |" for i, (b, f, r) in enumerate(zip(bf16["losses"], fp32["losses"], rel))]
    lines += ["", f"Mixed CE on the device, N = {a.loss_tokens} answer tokens, D = {a.shape['hidden_size']}, "
              f"V = {a.shape['vocab_size']}, bf16 inputs, joint (both heads trained); errors against an fp32 naive reference",
              "", "| impl | time ms | peak extra MiB | loss rel err | grad rel err |", "|---|---:|---:|---:|---:|"]
    for r in kernel:
        pk = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        lines.append(f"| {r['impl']} | {r['time_ms']:.1f} | {pk} | {r['loss_rel_err']:.2e} | {r['grad_rel_err']:.2e} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", "--dry-run", action="store_true", dest="cpu_smoke",
                   help="tiny shape on the CPU: proves the script runs (used by a test)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per phase (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fp32-steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--n-batches", type=int, default=4, help="distinct batches, cycled (the model can fit them)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--attn", default="auto", help="models.attn_implementation")
    p.add_argument("--loss-tokens", type=int, default=8192)
    p.add_argument("--loss-chunks", default="1024,4096", help="explicit chunks to compare with the budget")
    p.add_argument("--loss-reps", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the markdown report here")
    a = p.parse_args(argv)
    a.shape = dict(QWEN3_0_6B)
    if a.cpu_smoke:
        a.shape, a.steps, a.warmup, a.fp32_steps, a.micro_batch, a.seq_len = dict(TINY), 2, 1, 2, 2, 32
        a.n_batches, a.loss_tokens, a.loss_reps, a.loss_chunks = 2, 256, 1, "64"
        a.device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU, or pass --cpu-smoke for the tiny CPU run")
        a.device = torch.device("cuda")
    a.loss_chunks = [int(c) for c in a.loss_chunks.split(",") if c]
    from wmss_ray.models.loading import resolve_attn_implementation

    a.attn = resolve_attn_implementation(a.attn, a.device)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from wmss_ray.training.worker import init_single_process

    init_single_process(backend="nccl" if a.device.type == "cuda" else "gloo")
    t0 = time.perf_counter()
    phases = [run_phase(a, mode, torch.bfloat16, a.steps) for mode in ("sft", "frozen", "joint")]
    fp32 = run_phase(a, "joint", torch.float32, 0 if a.fp32_steps <= a.warmup else a.fp32_steps - a.warmup)
    fp32["losses"] = fp32["losses"][: a.fp32_steps]
    kernel = loss_kernel_check(a)
    text = report(a, phases, fp32, kernel) + f"\n\nWall time of the check: {time.perf_counter() - t0:.0f} s"
    print(text)
    print(json.dumps({"phases": phases, "fp32": fp32, "loss_kernel": kernel}, default=float))
    if a.out:
        cmd = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(a.out, "w") as f:
            f.write(f"# GPU check\n\nCommand: `{cmd}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
