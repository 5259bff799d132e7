"""Peak memory and step time of WMSS frozen: full fine-tuning vs LoRA, side by side, in one run.

Three variants of one frozen WMSS training step (``PairLM``: strong forward, weak forward, chunked
mixed CE, backward, AdamW step) on a Qwen3-architecture model built from its config (no weights
downloaded), each in a fresh process:

- **full**: the strong model fully trained (AdamW states for every weight), the weak model a
  second full copy (frozen);
- **lora_separate**: the strong model = base + LoRA adapter (``training.lora``: every linear layer
  of attention and MLP), the weak model a second full copy, as when its base differs;
- **lora_shared**: base + adapter, and the weak forward runs the same base with the adapter
  switched off (``PairLM(shared_weak=True)``): one copy of the base weights.

Memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) from before the models
are built to after the last step; on CPU the peak resident memory above the process's resident
memory before the models are built (weights, gradients, optimizer states, activations, loss
buffers: everything the step needs). Time: median wall and process-CPU time of ``--reps`` steps
after one warm-up (the CPU time is the steadier figure on a shared machine).

Usage::

    python benchmarks/lora_memory.py                          # ~100M Qwen3 (hidden 512, 12 layers, V 151,936)
    python benchmarks/lora_memory.py --device cuda            # on a GPU, bf16
    python benchmarks/lora_memory.py --hidden 256 --layers 4 --vocab 32000 --seq-len 128   # a busy CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from loss_memory import PeakRSS, machine  # noqa: E402

MB = 2**20
VARIANTS = ("full", "lora_separate", "lora_shared")


def qwen3(a, dtype, device):
    """A seeded Qwen3 causal LM from its config (tied embeddings, as the small Qwen3 models)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads // 2,
                      head_dim=a.hidden // a.heads, max_position_embeddings=max(a.seq_len, 128),
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).to(dtype=dtype, device=device)


def build(a, variant: str, dtype, device):
    """``(pair, optimizer, trained params, base params)`` of one variant."""
    from wmss_ray.config.schema import LoraConfig
    from wmss_ray.models.lora import attach_adapters
    from wmss_ray.training.pair import PairLM

    strong = qwen3(a, dtype, device)
    base_params = sum({id(p): p.numel() for p in strong.parameters()}.values())
    PairLM.prepare_for_training(strong, False, lora=variant != "full")
    weak = None
    if variant != "lora_shared":  # a second full copy of the base for the weak side
        weak = qwen3(a, dtype, device)
    if variant != "full":
        strong = attach_adapters(strong, LoraConfig(r=a.r), "bench", None, False, False, 0)
    shared = variant == "lora_shared"
    pair = PairLM(strong, weak, "frozen", 0.5, shared_weak=shared)
    params = [p for p in pair.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    return pair, opt, sum(p.numel() for p in params), base_params


def run_one(a, variant: str) -> dict:
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, a.vocab, (a.batch, a.seq_len), generator=g).to(device)
    labels = ids.clone()
    labels[:, : a.seq_len // 4] = -100  # the prompt
    mask = torch.ones_like(ids)
    n = float((labels[:, 1:] != -100).sum())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    times, cpu = [], []
    with PeakRSS() as rss:
        pair, opt, trained, base = build(a, variant, dtype, device)
        for _ in range(1 + a.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = pair(ids, mask, labels, num_tokens=n)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated(device) - start) if device.type == "cuda" else rss.peak_extra
    return {"variant": variant, "peak_mb": peak / MB, "step_s": statistics.median(times[1:]), "times": times,
            "cpu_s": statistics.median(cpu[1:]),
            "trained_params": trained, "base_params": base, "loss": float(loss.detach())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(run_one(a, a.worker)))
        return 0
    info = machine()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("worker", "out")]
    res = {}
    for variant in VARIANTS:  # fresh processes: one variant's allocations cannot hide another's peak
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant, *args], check=True,
                             capture_output=True, text=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    full = res["full"]
    lines = [f"WMSS frozen step, Qwen3 from config: {full['base_params'] / 1e6:.1f}M params (hidden {a.hidden}, "
             f"{a.layers} layers, vocab {a.vocab}, tied), batch {a.batch} x {a.seq_len} tokens, LoRA r {a.r} on every "
             f"attention/MLP linear, {a.device} {'bf16' if a.device.startswith('cuda') else 'fp32'}, AdamW; "
             f"step time = median of {a.reps} after 1 warm-up", "",
             "| variant | trained params | peak memory MB | step s | step CPU s | peak / full | step / full | CPU / full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        r = res[v]
        lines.append(f"| {v} | {r['trained_params'] / 1e6:.2f}M | {r['peak_mb']:.0f} | {r['step_s']:.3f} | "
                     f"{r['cpu_s']:.3f} | {r['peak_mb'] / full['peak_mb']:.3f} | {r['step_s'] / full['step_s']:.3f} | "
                     f"{r['cpu_s'] / full['cpu_s']:.3f} |")
    sep, shared = res["lora_separate"], res["lora_shared"]
    lines += ["", f"lora_shared / lora_separate: peak {shared['peak_mb'] / sep['peak_mb']:.3f}, "
                  f"step {shared['step_s'] / sep['step_s']:.3f}, CPU {shared['cpu_s'] / sep['cpu_s']:.3f}"]
    text = "\n".join(lines)
    print(info)
    print(text)
    if a.out:
        cmd = "python benchmarks/lora_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(a.out, "w") as f:
            f.write(f"# LoRA: peak memory and step time of WMSS frozen\n\nCommand: `{cmd}`\n\nMachine: {info}\n\n{text}\n")
    # the shared-base weak forward is the base model's: same loss as the separate copy at step 0
    return 0 if abs(shared["loss"] - sep["loss"]) <= 1e-3 * abs(sep["loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
