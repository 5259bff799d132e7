"""Weak pool vs colocated frozen weak, side by side in one run at equal total CPUs.

Three WMSS-frozen ``train_phase`` runs on one local Ray cluster of ``--cpus`` logical CPUs, the
same models, data and steps:

- colocated: 1 Train worker with all CPUs, the weak model inside it;
- pool, prefetch on (``mix.pool.prefetch``) and pool, prefetch 0: 1 Train worker with half the
  CPUs, 1 pool actor with the other half.

Prints, per run: seconds per optimizer step (the Train worker's training loop / steps, so
start-up is excluded; ratios against colocated), the Train worker's peak RSS, and for the pool
the reply bytes per answer token measured from the run's metrics, against ``8k + 8`` and, by
arithmetic at V = 151,936, against shipping bf16 logits (2 V bytes).

Usage::

    python benchmarks/weak_pool.py --steps 10 --hidden 512 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN_VOCAB = 151_936


def make_models_and_data(root: Path, hidden: int, layers: int, n_rows: int, seq: int, seed: int = 0) -> dict:
    """Strong/weak demo-architecture models and tokenised rows (answers on the second half)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wmss_ray.config.schema import DemoModelConfig
    from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    mc = DemoModelConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=max(256, seq))
    paths = {n: save_pretrained_model(build_tiny_model(mc, tok, s), tok, root / n) for n, s in (("strong", 1), ("weak", 2))}
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        length = int(rng.integers(seq // 2, seq))
        ids = rng.integers(5, len(tok), length).tolist()
        rows.append({"sample_id": f"s{i:05d}", "input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    (root / "tokenized").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "tokenized" / "part-0.parquet")
    pq.write_table(pa.table({"sample_id": [r["sample_id"] for r in rows]}), root / "sampled_ids.parquet")
    weak_bytes = sum(f.stat().st_size for f in Path(paths["weak"]).glob("*.safetensors"))
    return {**paths, "tokenized": str(root / "tokenized"), "sampled": str(root / "sampled_ids.parquet"),
            "weak_mb": weak_bytes / 2**20}


def run(art: dict, out: Path, cpus: float, steps: int, micro_batch: int, pool: dict | None) -> dict:
    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.io.files import read_metrics
    from wmss_ray.training.trainer import train_phase

    mix = {"lam": 0.5, "mode": "frozen"}
    if pool is not None:
        mix.update(placement="pool", pool=pool)
    train_cpus = cpus if pool is None else cpus - pool["cpus_per_actor"]
    cfg = config_from_dict({"mix": mix, "scaling": {"num_workers": 1, "cpus_per_worker": train_cpus},
                            "training": {"micro_batch_size": micro_batch, "max_steps": steps, "log_every": 10**6}})
    res = train_phase(cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"], str(out))
    end = [json.loads(line) for line in open(out / "workers.jsonl") if '"end"' in line][-1]
    metrics = read_metrics(res.metrics_path)
    return {"s_per_step": end["seconds"]["train"] / steps, "peak_rss_mb": end["peak_rss_mb"],
            "bytes_per_token": metrics[-1].get("pool_reply_bytes_per_token"), "loss": metrics[-1]["loss"],
            "trunc_bound": metrics[-1].get("trunc_bound"), "tail_mass": metrics[-1].get("weak_tail_mass_mean")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repetitions (median reported)")
    args = ap.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="wmss-bench-pool-"))
    art = make_models_and_data(root / "art", args.hidden, args.layers, args.steps * args.micro_batch, args.seq)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="wmss-ray-", dir="/tmp"),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    half = args.cpus / 2
    pool = {"replicas": 1, "shards": 1, "top_k": args.top_k, "cpus_per_actor": half, "exact_sample": 0}
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    variants = {"colocated frozen": None, f"pool, prefetch {args.prefetch}": {**pool, "prefetch": args.prefetch},
                "pool, prefetch 0": {**pool, "prefetch": 0}}
    trials: dict[str, list[dict]] = {name: [] for name in variants}
    for rep in range(args.repeats):  # interleaved, so drifting load on a shared machine hits all alike
        for i, (name, p) in enumerate(variants.items()):
            trials[name].append(run(art, root / f"r{rep}v{i}", args.cpus, args.steps, args.micro_batch, p))
    ray.shutdown()
    runs = {}
    for name, rs in trials.items():  # the median trial by step time
        runs[name] = sorted(rs, key=lambda r: r["s_per_step"])[len(rs) // 2]
    base = runs["colocated frozen"]
    k = args.top_k
    print(f"\n{args.cpus:g} CPUs in all; hidden {args.hidden}, {args.layers} layers, weak model {art['weak_mb']:.1f} MB "
          f"(safetensors), {args.steps} steps x {args.micro_batch} rows of {args.seq // 2}-{args.seq} tokens, "
          f"top_k {k}, median of {args.repeats} interleaved repetition(s)\n")
    print("| run | s/step | × colocated | Train-worker peak RSS (MB) | Δ RSS vs colocated (MB) | reply B/answer token |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        b = f"{r['bytes_per_token']:.0f}" if r["bytes_per_token"] is not None else "—"
        print(f"| {name} | {r['s_per_step']:.3f} | {r['s_per_step'] / base['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_rss_mb'] - base['peak_rss_mb']:+.0f} | {b} |")
    per = 8 * k + 8
    print(f"\nreply bytes per answer token: measured {runs['pool, prefetch 0']['bytes_per_token']:.0f}, formula 8k+8 = {per}; "
          f"at V = {QWEN_VOCAB:,}: bf16 logits 2V = {2 * QWEN_VOCAB:,} B -> {2 * QWEN_VOCAB / per:.0f}x less "
          f"(1/{2 * QWEN_VOCAB / per:.0f}); dense fp32 (top_k 0) would be 4V = {4 * QWEN_VOCAB:,} B")
    r = runs["pool, prefetch 0"]
    print(f"top-k truncation at the last step: bound {r['trunc_bound']:.2e} nats/token, weak tail mass {r['tail_mass']:.3f}")


if __name__ == "__main__":
    main()
