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
- ``steady``: scoring throughput without the fixed start-up cost: per worker (actor, or the
  plain loop), the rows of its batches after the first over the time from its first to its last
  batch, summed over workers (Ray: a second scoring pass with a scorer that stamps each batch
  with its pid and finish time). This is the figure that carries over to long runs, and it
  includes Ray Data's per-batch costs (moving blocks, batching, the actor call).

Each plain run happens in a fresh interpreter. The 1-thread plain loop runs twice (before and
after the Ray runs) and the mean of its times is the baseline, which damps drift from other processes on a shared machine; each row also shows the
1-minute load average when that run ended.

``--compare``: end to end only, side by side, every run in a fresh interpreter (Ray runs start
their own ``ray.init(num_cpus=N)``, not timed), alternating plain and Ray, ``--rounds`` times:
plain loop with N threads, the fused Ray path (``tokenize_and_score``: one execution, N actors x
1 CPU), plain loop with 1 thread (``--plain-threads``), the two-execution Ray path (``tokenize_corpus`` then
``score_tokenized``, as the pipeline's phases run it), taken from ``--old-tree`` when given (a
checkout of the code before the fused path, e.g. main). Each Ray figure is divided by the faster
plain run of its round (the baseline at N CPUs), so machine-wide drift cancels in the ratio.

Usage::

    python benchmarks/scoring_throughput.py                   # 2000 demo rows, demo model, N=2
    python benchmarks/scoring_throughput.py --quick           # smoke test (300 rows, tiny model)
    python benchmarks/scoring_throughput.py --out benchmarks/results_scoring.json
    python benchmarks/scoring_throughput.py --compare --rows 10000 --old-tree /work/main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# WMSS_BENCH_TREE: import wmss_ray from another checkout (the --old-tree runs of --compare)
sys.path.insert(0, os.environ.get("WMSS_BENCH_TREE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wmss_ray.config.loading import load_config  # noqa: E402


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
    from wmss_ray.data.chat_tokens import tokenize_example
    from wmss_ray.models.loading import load_tokenizer
    from wmss_ray.stages.scorer import EntropyScorer

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
        stamps.append((0, time.perf_counter(), len(chunk)))
    t1 = time.perf_counter()
    steady_rows, steady_s = steady_rate(stamps)
    return {"rows": len(rows), "end_to_end_s": t1 - t0, "scoring_s": t1 - t_tok, "tokenize_s": t_tok - t0,
            "steady_rows": steady_rows, "steady_s": steady_s, "load": os.getloadavg()[0]}


def plain_in_subprocess(base_cfg: str | None, overrides: list[str], paths: dict[str, str], threads: int):
    """``run_plain`` in a fresh interpreter: no Ray, no leftovers of building the models."""
    spec = json.dumps({"base_cfg": base_cfg, "overrides": overrides, "paths": paths, "threads": threads})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--plain-worker", spec],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class TimedScorer:
    """Mixin for EntropyScorer that stamps each output row with its process and finish time."""

    def __call__(self, batch):
        out = super().__call__(batch)
        n = len(out["sample_id"])
        return {**out, "pid": [os.getpid()] * n, "t_done": [time.time()] * n}


def steady_rate(stamps: list[tuple[int, float, int]]) -> tuple[int, float]:
    """``(rows, seconds)`` of start-up-free work from ``(worker, t_done, rows)`` per batch.

    Per worker: the rows of its batches after the first over the time from its first to its last
    batch; workers run in parallel, so rates add up: returns (total rows, rows / summed rate).
    """
    by_worker: dict[int, list[tuple[float, int]]] = {}
    for worker, t, rows in stamps:
        by_worker.setdefault(worker, []).append((t, rows))
    rate, rows_total = 0.0, 0
    for items in by_worker.values():
        items.sort()
        if len(items) > 1:
            rows = sum(r for _, r in items[1:])
            rate += rows / max(items[-1][0] - items[0][0], 1e-9)
            rows_total += rows
    return rows_total, rows_total / max(rate, 1e-9)


def run_ray(cfg, paths: dict[str, str], out_dir: str) -> dict[str, float]:
    """Pair check, tokenisation and scoring end to end (the pipeline's tokenize and score phases),
    then a second scoring pass over the ``tokenized/`` with a timed scorer for the steady rate
    (per actor, from its first to its last batch)."""
    import pyarrow as pa
    import ray

    from wmss_ray.cluster import ensure_ray
    from wmss_ray.models.loading import check_pair_compatible
    from wmss_ray.stages.score import score_dataset, score_tokenized
    from wmss_ray.stages.scorer import EntropyScorer
    from wmss_ray.stages.tokenize import tokenize_corpus
    from wmss_ray.stages.tokenize_io import read_tokenized

    t0 = time.perf_counter()
    check_pair_compatible(paths["weak"], paths["strong"], cfg.models.trust_remote_code)
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    tok = tokenize_corpus(cfg, paths["strong"], paths["corpus"], out_dir)
    res = score_tokenized(cfg, paths["weak"], paths["strong"], tok.tokenized_path, out_dir, check_pair=False)
    end_to_end_s = time.perf_counter() - t0
    timed = type("TimedEntropyScorer", (TimedScorer, EntropyScorer), {})
    ds = score_dataset(read_tokenized(res.tokenized_path, cfg.scoring.batch_size), cfg,
                       paths["weak"], paths["strong"], scorer_cls=timed)
    t = pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow")).select(["pid", "t_done"])
    groups = t.group_by(["pid", "t_done"]).aggregate([([], "count_all")]).to_pylist()
    steady_rows, steady_s = steady_rate([(g["pid"], g["t_done"], g["count_all"]) for g in groups])
    return {"rows": res.counts["rows_scored"], "end_to_end_s": end_to_end_s, "scoring_s": res.elapsed,
            "tokenize_s": tok.elapsed, "steady_rows": steady_rows, "steady_s": steady_s,
            "load": os.getloadavg()[0]}


def run_ray_e2e(cfg, paths: dict[str, str], out_dir: str, fused: bool) -> dict[str, float]:
    """Corpus -> scores.parquet on the running Ray: the fused path or the two executions."""
    import ray

    from wmss_ray.models.loading import check_pair_compatible

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    check_pair_compatible(paths["weak"], paths["strong"], cfg.models.trust_remote_code)
    if fused:
        from wmss_ray.stages.score import tokenize_and_score

        tok, res = tokenize_and_score(cfg, paths["strong"], paths["corpus"], out_dir, paths["weak"], paths["strong"],
                                      out_dir, check_pair=False)
    else:
        from wmss_ray.stages.score import score_tokenized
        from wmss_ray.stages.tokenize import tokenize_corpus

        tok = tokenize_corpus(cfg, paths["strong"], paths["corpus"], out_dir)
        res = score_tokenized(cfg, paths["weak"], paths["strong"], tok.tokenized_path, out_dir, check_pair=False)
    return {"rows": res.counts["rows_scored"], "end_to_end_s": time.perf_counter() - t0,
            "tokenize_s": tok.elapsed if not fused else float("nan"), "load": os.getloadavg()[0]}


def ray_worker(spec: dict) -> dict[str, float]:
    """One Ray run in this fresh process: ``ray.init(num_cpus=N)`` (not timed), then ``run_ray_e2e``."""
    import ray

    cfg = load_config(spec["base_cfg"], spec["overrides"])
    ray.init(num_cpus=spec["cpus"], include_dashboard=False, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="rb-", dir="/tmp"),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        return run_ray_e2e(cfg, spec["paths"], spec["out_dir"], spec["fused"])
    finally:
        ray.shutdown()


def ray_in_subprocess(spec: dict, tree: str | None = None) -> dict[str, float]:
    env = {**os.environ, **({"WMSS_BENCH_TREE": tree} if tree else {})}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--ray-worker", json.dumps(spec)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"ray worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(base_cfg: str | None, overrides: list[str], paths: dict[str, str], root: str, n_cpus: int,
            rounds: int, old_tree: str | None, plain_threads: tuple[int, int]) -> str:
    """Side-by-side end-to-end rates (see the module docstring); returns the markdown table."""
    ray_overrides = overrides + [f"scoring.num_actors={n_cpus}", "scoring.cpus_per_actor=1"]
    lines = ["| round | run | rows | end-to-end s | samples/s | x plain (faster plain of the round) | load avg |",
             "|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {}
    for r in range(rounds):
        runs = []
        t_a, t_b = plain_threads
        for name, kind in ((f"plain loop, {t_a} torch thread(s)", f"plain_{t_a}"), ("ray, fused (new)", "fused"),
                           (f"plain loop, {t_b} torch thread(s)", f"plain_{t_b}"),
                           (f"ray, two executions ({'old tree' if old_tree else 'this tree'})", "two")):
            if kind.startswith("plain"):
                res = plain_in_subprocess(base_cfg, overrides, paths, int(kind.split("_")[1]))
            else:
                spec = {"base_cfg": base_cfg, "overrides": ray_overrides, "paths": paths, "cpus": n_cpus,
                        "out_dir": f"{root}/{kind}{r}", "fused": kind == "fused"}
                res = ray_in_subprocess(spec, old_tree if kind == "two" else None)
            runs.append((name, kind, res))
            print(f"  round {r + 1}: {name}: {res['end_to_end_s']:.1f} s", flush=True)
        base = min((res for _, kind, res in runs if kind.startswith("plain")), key=lambda x: x["end_to_end_s"])
        for name, kind, res in runs:
            x = base["end_to_end_s"] / res["end_to_end_s"]
            if not kind.startswith("plain"):
                ratios.setdefault(name, []).append(x)
            lines.append(f"| {r + 1} | {name} | {res['rows']:.0f} | {res['end_to_end_s']:.1f} "
                         f"| {res['rows'] / res['end_to_end_s']:.1f} | {x:.2f} | {res['load']:.1f} |")
    lines.append("")
    lines += [f"- {name}: x plain = {', '.join(f'{v:.2f}' for v in vs)}" for name, vs in ratios.items()]
    return "\n".join(lines)


def rates(r: dict[str, float]) -> dict[str, float]:
    """samples/s: end-to-end, scoring (start-up included), steady (start-up excluded)."""
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
    ap.add_argument("--compare", action="store_true", help="end to end only, plain vs fused vs two executions, alternating")
    ap.add_argument("--rounds", type=int, default=1, help="--compare: rounds of the 4 runs")
    ap.add_argument("--old-tree", default=None, help="--compare: run the two-execution path from this checkout")
    ap.add_argument("--plain-threads", default=None,
                    help="--compare: torch threads of the two plain runs of a round, e.g. 1,1 (default N,1; on an "
                         "oversubscribed machine N threads collapse, see results_scoring.md)")
    ap.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ray-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain_worker:  # internal: one plain run in this fresh process
        spec = json.loads(args.plain_worker)
        print(json.dumps(run_plain(load_config(spec["base_cfg"], spec["overrides"]), spec["paths"], spec["threads"])))
        return 0
    if args.ray_worker:  # internal: one Ray run in this fresh process
        print(json.dumps(ray_worker(json.loads(args.ray_worker))))
        return 0
    n, N = (300 if args.quick else args.rows), args.cpus
    base_cfg = "configs/test-tiny.yaml" if args.quick else None
    overrides = [f"data.demo.n_train={n}", "data.demo.n_eval=1", f"scoring.batch_size={args.batch_size}"]
    cfg = load_config(base_cfg, overrides)

    import ray

    root = tempfile.mkdtemp(prefix="wmss-bench-scoring-", dir="/tmp")
    paths = build_world(cfg, root)
    print(f"world: {n} rows, model {cfg.models.demo_model.model_dump()}, batch {args.batch_size}, N={N}", flush=True)
    if args.compare:
        threads = tuple(int(t) for t in (args.plain_threads or f"{N},1").split(","))
        print(compare(base_cfg, overrides, paths, root, N, args.rounds, args.old_tree, threads))
        return 0
    results: list[tuple[str, int, dict[str, float]]] = []
    plain_1a = plain_in_subprocess(base_cfg, overrides, paths, 1)
    plain_n = plain_in_subprocess(base_cfg, overrides, paths, N)
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
    plain_1b = plain_in_subprocess(base_cfg, overrides, paths, 1)
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
