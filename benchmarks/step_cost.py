"""Cost of one WMSS optimizer step (frozen, joint) relative to SFT, same batch and model size.

Every mode runs the real training step (``wmss_ray.training.worker.PhaseWorker.train_step``:
DeepSpeed engine over the pair module, chunked mixed CE, AdamW) in a fresh single-process
subprocess (world size 1, ZeRO stage ``--zero``), so peak memory is measured per mode:

- time: median wall-clock seconds per step and mean process CPU seconds per step (user + sys of
  all threads; less sensitive to other processes on a shared machine) over ``--steps`` steps
  after ``--warmup`` warm-up steps;
- memory: peak resident set (VmHWM) and its growth over the resident set after imports (CPU), or
  ``torch.cuda.max_memory_allocated`` (GPU).

Ideal ratios (forward = 1 unit, backward = 2): frozen = SFT + one weak forward = 4/3;
joint = twice SFT = 2. Targets: frozen <= 1.45x, joint <= 2.1x.

Usage::

    python benchmarks/step_cost.py                      # hidden 512, 4 layers, vocab 4096, seq 256
    python benchmarks/step_cost.py --quick              # tiny smoke run
    python benchmarks/step_cost.py --out benchmarks/results_step_cost.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("sft", "frozen", "joint")
MB = 2**20


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_artifacts(root: str, args) -> dict[str, str]:
    """Two random Llama models of the benchmark size and ``--rows`` tokenised rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()  # only its pad id is used; the models' vocabulary is larger
    paths = {}
    for name, seed in (("strong", 1), ("weak", 2)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq,
                          tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
        out = os.path.join(root, name)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paths[name] = out
    rng = np.random.default_rng(0)
    n_prompt = int(args.seq * (1 - args.answer_frac))
    rows = []
    for i in range(args.rows):
        ids = rng.integers(5, args.vocab, args.seq).tolist()
        rows.append({"sample_id": f"r{i:05d}", "input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    os.makedirs(os.path.join(root, "tokenized"))
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "tokenized", "part-0.parquet"))
    pq.write_table(pa.table({"sample_id": [r["sample_id"] for r in rows]}), os.path.join(root, "sampled.parquet"))
    paths.update(tokenized=os.path.join(root, "tokenized"), sampled=os.path.join(root, "sampled.parquet"))
    return paths


def run_mode(mode: str, paths: dict[str, str], args) -> dict:
    """One mode in this process: build the worker, warm up, time ``args.steps`` steps."""
    import torch

    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.training.dataset import DataPlan, write_epoch_rows
    from wmss_ray.training.worker import PhaseSpec, PhaseWorker, init_single_process

    torch.set_num_threads(args.threads or torch.get_num_threads())
    base_rss = _rss()
    cfg = config_from_dict({
        "training": {"micro_batch_size": args.micro_batch, "grad_accum": 1, "zero_stage": args.zero, "lr": 1e-4},
        "mix": {"lam": 0.5, "chunk_mb": args.chunk_mb},
        "models": {"dtype": "auto"},
    })
    out_dir = tempfile.mkdtemp(prefix="step-cost-")
    epoch_rows = os.path.join(out_dir, "epoch_rows.parquet")
    n_rows = write_epoch_rows(paths["tokenized"], None, epoch_rows)
    n_steps = args.warmup + args.steps
    plan = DataPlan(n_rows, 1.0, 0, args.micro_batch, 1, 1, exact_steps=n_steps)
    phase = "sft" if mode == "sft" else "wmss"
    spec = PhaseSpec(phase, mode, paths["strong"], paths["weak"] if mode != "sft" else None,
                     out_dir, paths["tokenized"], epoch_rows, plan)
    init_single_process("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    worker = PhaseWorker(cfg, spec, 0, 1, device)
    walls, cpus, losses = [], [], []
    for step in range(n_steps):
        if device.type == "cuda" and step == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        c0, t0 = time.process_time(), time.perf_counter()
        m = worker.train_step(step)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        losses.append(m["loss"])
        if step >= args.warmup:
            walls.append(wall)
            cpus.append(cpu)
    out = {"mode": mode, "wall_s": statistics.median(walls), "cpu_s": statistics.mean(cpus),
           "loss_first": losses[0], "loss_last": losses[-1],
           "tokens_per_step": args.micro_batch * args.seq}
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / MB
    else:
        out["peak_mb"] = _vm_hwm() / MB
        out["peak_growth_mb"] = (_vm_hwm() - base_rss) / MB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--answer-frac", type=float, default=0.5, help="share of each row that is supervised")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--chunk-mb", type=float, default=16.0,
                   help="mix.chunk_mb (16: 1,024 answer tokens per loss chunk at the default --vocab 4096)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument("--out", help="also write a markdown table here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_paths", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq, args.rows, args.steps = 64, 2, 512, 64, 16, 2
    if args._child:  # a fresh process per mode, so that peak memory is per mode
        print("RESULT " + json.dumps(run_mode(args._child, json.loads(args._paths), args)), flush=True)
        return

    root = tempfile.mkdtemp(prefix="wmss-step-cost-")
    paths = make_artifacts(root, args)
    child_args, skip = [], False  # this command line minus --out
    for a in sys.argv[1:]:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        child_args.append(a)
    results = {}
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), *child_args, "--_child", mode, "--_paths", json.dumps(paths)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"mode {mode} failed (exit {proc.returncode})")
        results[mode] = json.loads(line[len("RESULT "):])
        print(f"{mode}: {results[mode]}", flush=True)

    sft = results["sft"]
    mem_key = "peak_growth_mb" if args.device == "cpu" else "peak_mb"
    header = (f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.micro_batch} x "
              f"seq {args.seq} ({args.answer_frac:.0%} answer tokens); ZeRO {args.zero}; {args.device}, "
              f"torch threads {args.threads or 'default'}; {args.steps} timed steps after {args.warmup} warm-up")
    lines = [header, "", "| mode | wall s/step | x SFT | CPU s/step | x SFT | peak MB | "
             f"{'peak growth MB' if args.device == 'cpu' else 'peak alloc MB'} | x SFT | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    targets = {"sft": "1", "frozen": "<= 1.45 (ideal 1.33)", "joint": "<= 2.1 (ideal 2.0)"}
    for mode in MODES:
        r = results[mode]
        lines.append(f"| {mode} | {r['wall_s']:.3f} | {r['wall_s'] / sft['wall_s']:.2f} | {r['cpu_s']:.3f} | "
                     f"{r['cpu_s'] / sft['cpu_s']:.2f} | {r['peak_mb']:.0f} | {r[mem_key]:.0f} | "
                     f"{r[mem_key] / sft[mem_key]:.2f} | {targets[mode]} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
