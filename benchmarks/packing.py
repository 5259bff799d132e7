"""Answer tokens per second with sequence packing vs padded micro-batches, on two corpora.

Both layouts run the real training step (``PhaseWorker.train_step``: DeepSpeed engine over the
pair module, chunked loss, AdamW; SFT by default) from the same initial model on the same rows,
in one process, steps interleaved (padded step s, packed step s, ...) so that a shared machine's
noise hits both alike. Reported per corpus:

- padding fraction: pad positions / all positions of the padded micro-batches actually trained;
- answer tokens/s (wall) and per CPU-second (process time, less sensitive to other processes),
  median over the timed steps, and the packed/padded ratios;
- the largest per-step loss difference (the layouts are exact: it should be ~1e-6).

Corpora: ``demo`` (the demo world's worked arithmetic problems, chat-templated with the demo
tokenizer: similar lengths) and ``longtail`` (random tokens, lognormal lengths: median
``--tail-median`` tokens, sigma ``--tail-sigma``, capped at ``--tail-max``; half of each row
supervised).

Usage::

    python benchmarks/packing.py                 # hidden 256, 4 layers, micro-batch 8, 12 timed steps
    python benchmarks/packing.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_rows(n: int, tok, max_len: int) -> list[dict]:
    from wmss_ray.config.schema import DemoDataConfig
    from wmss_ray.data.synthetic import generate_split
    from wmss_ray.data.chat_tokens import tokenize_example

    rows = []
    for i, r in enumerate(generate_split("train", n, 0, DemoDataConfig())):
        t = tokenize_example(tok, r["messages"][:-1], r["messages"][-1]["content"], max_len)
        rows.append({"sample_id": f"d{i:06d}", **t})
    return rows


def longtail_rows(n: int, vocab: int, median: int, sigma: float, max_len: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 8, max_len).astype(int)
    rows = []
    for i, n_tok in enumerate(lengths):
        ids = rng.integers(5, vocab, n_tok).tolist()
        prompt = n_tok // 2
        rows.append({"sample_id": f"t{i:06d}", "input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def build(root: str, args) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                       num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                       num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.tail_max,
                       pad_token_id=tok.pad_token_id)
    out = {"model": os.path.join(root, "model")}
    LlamaForCausalLM(mcfg).save_pretrained(out["model"])
    tok.save_pretrained(out["model"])
    corpora = {"demo": demo_rows(args.rows, tok, 256),
               "longtail": longtail_rows(args.rows, len(tok), args.tail_median, args.tail_sigma, args.tail_max)}
    for name, rows in corpora.items():
        os.makedirs(os.path.join(root, name))
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, name, "part-0.parquet"))
        out[name] = os.path.join(root, name)
    return out


def make_worker(paths: dict, corpus: str, packing: bool, args, n_steps: int):
    import torch

    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.training.dataset import DataPlan, write_epoch_rows
    from wmss_ray.training.worker import PhaseSpec, PhaseWorker

    cfg = config_from_dict({"training": {"micro_batch_size": args.micro_batch, "grad_accum": 1, "lr": 1e-4,
                                         "packing": packing}})
    out_dir = tempfile.mkdtemp(prefix="wmss-packing-")
    epoch_rows = os.path.join(out_dir, "epoch_rows.parquet")
    n = write_epoch_rows(paths[corpus], None, epoch_rows)
    plan = DataPlan(n, 1.0, 0, args.micro_batch, 1, 1, exact_steps=n_steps)
    spec = PhaseSpec("sft", "sft", paths["model"], None, out_dir, paths[corpus], epoch_rows, plan)
    return PhaseWorker(cfg, spec, 0, 1, torch.device("cpu"))


def run_corpus(paths: dict, corpus: str, args) -> dict:
    from wmss_ray.training.dataset import input_tokens

    n_steps = args.warmup + args.steps
    workers = {p: make_worker(paths, corpus, p, args, n_steps) for p in (False, True)}
    real = total = 0
    per = {p: {"wall": [], "cpu": [], "loss": []} for p in workers}
    for step in range(n_steps):
        b = workers[False].micro_batches(step)[0]
        real, total = real + input_tokens(b), total + b["input_ids"].numel()
        for p, w in workers.items():
            c0, t0 = time.process_time(), time.perf_counter()
            m = w.train_step(step)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            per[p]["loss"].append(m["loss"])
            if step >= args.warmup:
                per[p]["wall"].append(m["n_tokens"] / wall)
                per[p]["cpu"].append(m["n_tokens"] / cpu)
    res = {"corpus": corpus, "padding_fraction": 1 - real / total,
           "max_loss_diff": max(abs(a - b) for a, b in zip(per[False]["loss"], per[True]["loss"]))}
    for p, name in ((False, "padded"), (True, "packed")):
        res[f"{name}_tok_s"] = statistics.median(per[p]["wall"])
        res[f"{name}_tok_cpu_s"] = statistics.median(per[p]["cpu"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--tail-median", type=int, default=96)
    p.add_argument("--tail-sigma", type=float, default=0.9)
    p.add_argument("--tail-max", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.rows, args.steps, args.tail_max = 64, 2, 64, 2, 256
    import torch

    from wmss_ray.training.worker import init_single_process

    torch.set_num_threads(args.threads)
    init_single_process()
    paths = build(tempfile.mkdtemp(prefix="wmss-packing-bench-"), args)
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, sdpa, fp32, CPU, torch threads {args.threads}; "
          f"SFT, micro-batch {args.micro_batch}; {args.steps} timed steps after {args.warmup}; long tail: lognormal "
          f"median {args.tail_median}, sigma {args.tail_sigma}, max {args.tail_max}\n")
    print("| corpus | padding fraction | padded ans tok/s | packed ans tok/s | packed/padded (wall) | "
          "packed/padded (CPU) | max loss diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for corpus in ("demo", "longtail"):
        r = run_corpus(paths, corpus, args)
        print(f"| {corpus} | {r['padding_fraction']:.1%} | {r['padded_tok_s']:.0f} | {r['packed_tok_s']:.0f} | "
              f"{r['packed_tok_s'] / r['padded_tok_s']:.2f} | {r['packed_tok_cpu_s'] / r['padded_tok_cpu_s']:.2f} | "
              f"{r['max_loss_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
