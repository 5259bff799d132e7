"""SFT step time by precision (``training.autocast``) beside the plain PyTorch loop, side by side.

Runs the project's training rank (``PhaseWorker``, world size 1, no Ray) with bf16 weights
(ZeRO-1: DeepSpeed's BF16_Optimizer; ZeRO-2) and with fp32 weights under bf16 autocast
(``training.autocast``, ZeRO-0: the client AdamW itself; ZeRO-2), and the plain loop of
``gpu_check_steps.plain_sft`` (HF model and loss, fp32 weights under bf16 autocast, AdamW), on the
same random Qwen3-shaped model and fixed-length rows. Each is timed ``--reps`` times in turn (A B
A B: this machine is noisy); printed: median step seconds per repetition and the mean's ratio to
the plain loop's.

On a CPU it says whether autocast costs anything there; the gap it is meant to close (DeepSpeed's
per-parameter host work, ~455 copies per step on an H200) shows only on a GPU, where
``benchmarks/gpu_check.py`` times the same variants in its step matrix.

Usage::

    python benchmarks/precision_step.py                       # CPU: tiny-big shape, 8 x 512 tokens
    python benchmarks/precision_step.py --shape qwen3-0.6b --seq-len 2048 --micro-batch 4   # a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from gpu_check_setup import SHAPES, Setup, Variant, free, make_worker, save_model, write_rows
from gpu_check_steps import plain_sft, sync

VARIANTS = [Variant("sft z1 (bf16 weights)", "sft", 1, False, packing=False),
            Variant("sft z2 (bf16 weights)", "sft", 2, False, packing=False),
            Variant("sft z0 autocast", "sft", 0, False, packing=False, autocast=True),
            Variant("sft z2 autocast", "sft", 2, False, packing=False, autocast=True)]


def time_variant(s: Setup, v: Variant, model: str, rows: str) -> float:
    """Median seconds per step of ``v`` after ``s.warmup`` steps."""
    worker, _ = make_worker(s, v, model, model, rows, s.warmup + s.steps, s.micro_batch)
    times = []
    for step in range(s.warmup + s.steps):
        t0 = time.perf_counter()
        worker.train_step(step)  # synchronises the device at its end
        times.append(time.perf_counter() - t0)
    worker.engine.destroy()
    del worker
    free()
    return statistics.median(times[s.warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny-big", choices=sorted(SHAPES))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    from wmss_ray.training.worker import init_single_process

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_single_process("nccl" if device.type == "cuda" else "gloo")
    root = tempfile.mkdtemp(prefix="precision-step-")
    s = Setup(device, root, a.shape, a.shape, a.seq_len, a.micro_batch, a.micro_batch, a.warmup, a.steps, 2, 256,
              [64], 2, 4)
    model = save_model(a.shape, 0, os.path.join(root, "model"), device)
    rows = write_rows(os.path.join(root, "rows"), (a.warmup + a.steps) * a.micro_batch, a.seq_len,
                      SHAPES[a.shape]["vocab_size"], 0, False)
    times: dict[str, list[float]] = {"plain PyTorch SFT (autocast)": []} | {v.label: [] for v in VARIANTS}
    for _ in range(a.reps):
        times["plain PyTorch SFT (autocast)"].append(plain_sft(s, model, rows, a.micro_batch, False)["step_s"])
        for v in VARIANTS:
            sync(s)
            times[v.label].append(time_variant(s, v, model, rows))
    plain = statistics.mean(times["plain PyTorch SFT (autocast)"])
    print(f"\n{a.shape}, {a.micro_batch} x {a.seq_len} tokens, {device}, {a.reps} repetitions A B A B")
    print(f"{'variant':32s} {'step s per repetition':>26s} {'x plain step time':>18s}")
    for label, xs in times.items():
        print(f"{label:32s} {' / '.join(f'{x:.4f}' for x in xs):>26s} {statistics.mean(xs) / plain:18.2f}")


if __name__ == "__main__":
    main()
