"""Activation memory and time of ``training.gradient_checkpointing``, side by side, on CPU.

A joint WMSS step (``PairLM``: strong and weak decoders both trained, chunked mixed CE) with
and without non-reentrant activation checkpointing, on a small Qwen3-shaped model:

- **saved activations**: bytes autograd holds for backward at the end of the forward (counted
  with ``torch.autograd.graph.saved_tensors_hooks``; checkpointed layers keep only their inputs);
- **peak RSS**: peak resident memory of forward + backward above the resident memory once the
  models exist (each variant in a fresh process; the kernel's ``VmHWM``);
- **time**: median wall and process-CPU time of ``--reps`` steps after one warm-up (the CPU
  time is the steadier figure on a shared machine).

Usage::

    python benchmarks/checkpointing.py                 # defaults below
    python benchmarks/checkpointing.py --quick         # smoke sizes
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


def build(a, ckpt: bool):
    from wmss_ray.config.schema import DemoModelConfig
    from wmss_ray.models.tiny import build_tiny_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer
    from wmss_ray.training.pair import PairLM

    tok = build_demo_tokenizer()
    mc = DemoModelConfig(arch="qwen3", hidden_size=a.hidden, intermediate_size=3 * a.hidden, num_layers=a.layers,
                         num_heads=a.heads, num_kv_heads=a.heads // 2, max_position_embeddings=a.seq_len)
    models = [build_tiny_model(mc, tok, seed) for seed in (1, 2)]
    for m in models:
        PairLM.prepare_for_training(m, ckpt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (a.batch, a.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : a.seq_len // 4] = -100
    return PairLM(*models, "joint", 0.5), ids, labels


def run_one(a, ckpt: bool) -> dict:
    pair, ids, labels = build(a, ckpt)
    mask = torch.ones_like(ids)
    n = float((labels[:, 1:] != -100).sum())
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times, cpu = [], []
    with PeakRSS() as mem:
        for rep in range(1 + a.reps):
            pair.zero_grad(set_to_none=True)
            saved[0] = 0
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = pair(ids, mask, labels, num_tokens=n)
            loss.backward()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"checkpointing": ckpt, "saved_mb": saved[0] / MB, "peak_extra_mb": mem.peak_extra / MB,
            "time_s": statistics.median(times[1:]), "cpu_s": statistics.median(cpu[1:]), "times": times,
            "loss": float(loss.detach())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.batch, a.seq_len, a.reps = 64, 2, 2, 64, 1
    if a.worker:
        print(json.dumps(run_one(a, a.worker == "on")))
        return 0
    info = machine()
    args = [f"--hidden={a.hidden}", f"--layers={a.layers}", f"--heads={a.heads}", f"--batch={a.batch}",
            f"--seq-len={a.seq_len}", f"--reps={a.reps}"]
    res = {}
    for flag in ("off", "on"):  # fresh processes, so one variant's allocations cannot hide the other's peak
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", flag, *args], check=True,
                             capture_output=True, text=True).stdout
        res[flag] = json.loads(out.strip().splitlines()[-1])
    off, on = res["off"], res["on"]
    lines = [f"Joint PairLM step (2 Qwen3-shaped decoders, hidden {a.hidden}, {a.layers} layers, batch {a.batch} x "
             f"{a.seq_len} tokens, fp32, CPU); time = median of {a.reps} after 1 warm-up", "",
             "| checkpointing | saved activations MB | peak extra RSS MB | time s | CPU time s | loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in (off, on):
        lines.append(f"| {'on' if r['checkpointing'] else 'off'} | {r['saved_mb']:.0f} | {r['peak_extra_mb']:.0f} | "
                     f"{r['time_s']:.2f} | {r['cpu_s']:.2f} | {r['loss']:.6f} |")
    lines += ["", "| figure | on / off |", "|---|---:|"]
    for key, label in (("saved_mb", "saved activations"), ("peak_extra_mb", "peak extra RSS"), ("time_s", "time"),
                       ("cpu_s", "CPU time")):
        lines.append(f"| {label} | {on[key] / off[key]:.3f} |")
    text = "\n".join(lines)
    print(info)
    print(text)
    if a.out:
        cmd = "python benchmarks/checkpointing.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(a.out, "w") as f:
            f.write(f"# Gradient checkpointing: activation memory and time (CPU)\n\nCommand: `{cmd}`\n\n"
                    f"Machine: {info}\n\n{text}\n")
    return 0 if abs(on["loss"] - off["loss"]) <= 1e-6 * abs(off["loss"]) else 1  # same loss either way


if __name__ == "__main__":
    sys.exit(main())
