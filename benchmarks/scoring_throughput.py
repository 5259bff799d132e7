"""Samples/s of entropy scoring: the Ray Data path (1 and 2 actors) vs a plain single-process loop.

Same data, same models, same tokenisation code, equal CPUs. The plain loop runs with
``torch.set_num_threads(k)`` for k = 1 and N; Ray runs on ``ray.init(num_cpus=N)`` with 1 actor
x 1 CPU, N actors x 1 CPU and 1 actor x N CPUs (an actor computes with as many torch threads as
CPUs it reserved). Each Ray row is compared with the plain loop at the same number of CPUs; at N
CPUs the baseline is the faster of the two plain configurations (on a small model, or a busy
machine, intra-op threads can make torch slower, not faster).

Three figures per path:

- ``end_to_end``: corpus file -> ``scores.parquet`` (read, normalise, tokenise, both models,
  write; for Ray this includes starting the tokenizer and scorer actors, not ``ray.init``).
- ``scoring``: tokenised rows -> scores, model loading (and actor start) included.
- ``steady``: scoring throughput between the first and the last batch of scores, i.e. without
  the fixed start-up cost; this is the figure that carries over to long runs.

The plain loop runs twice (before and after the Ray runs) and the mean of its times is the
baseline, which damps drift from other processes on a shared machine; each row also shows the
1-minute load average when that run ended.

Usage::

    python benchmarks/scoring_throughput.py                   # 2000 demo rows, demo model, N=2
    python benchmarks/scoring_throughput.py --quick           # smoke test (300 rows, tiny model)
    python benchmarks/scoring_throughput.py --out benchmarks/results_scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wmss_ray.config import load_config  # noqa: E402


def build_world(cfg, root: str) -> dict[str, str]:
    """Weak + strong demo models (random init, seeds 1 and 2) and a demo train corpus."""
    from wmss_ray.data.synthetic import write_demo_corpus
    from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    paths = {name: save_pretrained_model(build_tiny_model(cfg.models.demo_model, tok, seed), tok, f"{root}/{name}")
             for name, seed in (("weak", 1), ("strong", 2))}
    paths["corpus"] = write_demo_corpus(cfg.data.demo, 0, f"{root}/data")["train"]
    return paths


def run_plain(cfg, paths: dict[str, str], threads: int) -> dict[str, float]:
    """The single-process reference: read -> tokenise -> EntropyScorer in batches, no Ray."""
    import torch

    from wmss_ray.data.corpus import iter_corpus, open_corpus
    from wmss_ray.data.tokenize import tokenize_example
    from wmss_ray.models.loading import load_tokenizer
    from wmss_ray.scoring.scorer import EntropyScorer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = load_tokenizer(paths["strong"])
    rows = [tokenize_example(tok, r["prompt_messages"], r["answer"], cfg.data.max_seq_len, cfg.data.truncation)
            for r in iter_corpus(open_corpus(paths["corpus"], cfg.data), cfg.data)]
    t_tok = time.perf_counter()
    scorer = EntropyScorer(paths["weak"], paths["strong"], chunk_size=cfg.scoring.chunk_size, num_threads=threads)
    bs, stamps = cfg.scoring.batch_size, []
    for start in range(0, len(rows), bs):
        chunk = rows[start:start + bs]
        scorer.score_rows([r["input_ids"] for r in chunk], [r["labels"] for r in chunk])
        stamps.append((time.perf_counter(), start + len(chunk)))
    t1 = time.perf_counter()
    (t_first, n_first) = stamps[0]
    return {"rows": len(rows), "end_to_end_s": t1 - t0, "scoring_s": t1 - t_tok, "tokenize_s": t_tok - t0,
            "steady_rows": len(rows) - n_first, "steady_s": t1 - t_first, "load": os.getloadavg()[0]}


def run_ray(cfg, paths: dict[str, str], out_dir: str) -> dict[str, float]:
    from wmss_ray.scoring.ray_scoring import score_corpus

    stamps: list[tuple[float, int]] = []
    res = score_corpus(cfg, paths["weak"], paths["strong"], paths["corpus"], out_dir,
                       progress=False, progress_callback=lambda done: stamps.append((time.perf_counter(), done)))
    manifest = json.loads(open(res.manifest_path).read())
    n = res.counts["rows_scored"]
    (t_first, n_first), (t_last, _) = stamps[0], stamps[-1]
    return {"rows": n, "end_to_end_s": res.elapsed, "scoring_s": manifest["score_elapsed_s"],
            "tokenize_s": manifest["tokenize_elapsed_s"], "steady_rows": n - n_first,
            "steady_s": t_last - t_first, "load": os.getloadavg()[0]}


def rates(r: dict[str, float]) -> dict[str, float]:
    """samples/s: end-to-end, scoring (start-up included), steady (first to last score batch)."""
    return {"end_to_end": r["rows"] / r["end_to_end_s"], "scoring": r["rows"] / r["scoring_s"],
            "steady": r["steady_rows"] / max(r["steady_s"], 1e-9)}


def table(results: list[tuple[str, int, dict[str, float]]], bases: dict[int, dict[str, float]]) -> str:
    lines = ["| path | CPUs | rows | end-to-end samples/s | x plain | scoring samples/s | x plain "
             "| steady samples/s | x plain | tokenize s | scoring s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, cpus, r in results:
        x, b = rates(r), rates(bases[cpus])
        lines.append(
            f"| {name} | {cpus} | {r['rows']:.0f} | {x['end_to_end']:.1f} | {x['end_to_end'] / b['end_to_end']:.2f} "
            f"| {x['scoring']:.1f} | {x['scoring'] / b['scoring']:.2f} | {x['steady']:.1f} "
            f"| {x['steady'] / b['steady']:.2f} | {r['tokenize_s']:.1f} | {r['scoring_s']:.1f} | {r['load']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=2, help="N: Ray num_cpus and the plain loop's most torch threads")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="smoke test: 300 rows, the test-tiny model")
    ap.add_argument("--out", default=None, help="also write the raw timings as JSON here")
    args = ap.parse_args(argv)
    n, N = (300 if args.quick else args.rows), args.cpus
    base_cfg = "configs/test-tiny.yaml" if args.quick else None
    overrides = [f"data.demo.n_train={n}", "data.demo.n_eval=1", f"scoring.batch_size={args.batch_size}"]
    cfg = load_config(base_cfg, overrides)

    import ray

    root = tempfile.mkdtemp(prefix="wmss-bench-scoring-", dir="/tmp")
    paths = build_world(cfg, root)
    print(f"world: {n} rows, model {cfg.models.demo_model.model_dump()}, batch {args.batch_size}, N={N}", flush=True)
    results: list[tuple[str, int, dict[str, float]]] = []
    plain_1a = run_plain(cfg, paths, 1)
    plain_n = run_plain(cfg, paths, N)
    ray.init(num_cpus=N, include_dashboard=False, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="rb-", dir="/tmp"),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        for actors, cpus in ((1, 1), (N, 1), (1, N)):
            c = load_config(base_cfg, overrides + [f"scoring.num_actors={actors}", f"scoring.cpus_per_actor={cpus}"])
            r = run_ray(c, paths, f"{root}/ray{actors}x{cpus}")
            results.append((f"ray data, {actors} actor(s) x {cpus} CPU", actors * cpus, r))
            print(f"  done: {results[-1][0]}", flush=True)
    finally:
        ray.shutdown()
    plain_1b = run_plain(cfg, paths, 1)
    plain_1 = {k: (plain_1a[k] + plain_1b[k]) / 2 for k in plain_1a}  # mean times of the two runs
    # Baseline at N CPUs: the faster plain configuration that uses at most N CPUs.
    best_n = min((plain_1, plain_n), key=lambda r: r["scoring_s"])
    bases = {1: plain_1, N: best_n}
    results = [(f"plain loop, 1 torch thread (mean time of 2 runs)", 1, plain_1),
               (f"plain loop, 1 torch thread, run 1", 1, plain_1a), (f"plain loop, 1 torch thread, run 2", 1, plain_1b),
               (f"plain loop, {N} torch threads", N, plain_n), *results]
    print(f"baseline at {N} CPUs: {'plain loop, 1 thread' if best_n is plain_1 else f'plain loop, {N} threads'}")
    print(table(results, bases))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": [[a, b, c] for a, b, c in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
