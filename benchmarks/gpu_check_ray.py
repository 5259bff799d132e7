"""The GPU check's ``ray`` part: the training path as ``wmss run`` drives it, through Ray Train.

Every other part drives the project's training rank (``PhaseWorker``) in this process; this one
calls :func:`wmss_ray.training.trainer.train_phase`, the pipeline's own entry, so the runs go
through Ray Train's worker group on the GPU (NCCL process group, ``CUDA_VISIBLE_DEVICES`` set by
Ray), its checkpoints on storage, the export, and in-run validation. Five short runs of the
check's end-to-end shape (the recipe: ZeRO-2, activation checkpointing, packing, attention
``auto``; ``log_every`` 1):

1. ``sft``: 4 steps, validating itself at step 2 (rank 0 exports ``interim_model/``, a barrier,
   every rank generates and scores the validation rows), then the final export;
2. ``joint``: WMSS from that export (an export reloaded as the next phase's strong model, as the
   pipeline chains phases), the weak model trained too;
3. ``frozen stopped``: WMSS frozen, stopped after step 2 (a Ray Train checkpoint), then
4. ``frozen resumed``: the same call again, which resumes from that checkpoint;
5. ``frozen pool``: the weak model served by a pool actor on a fraction of the GPU beside the
   training rank's fraction (``top_k`` 0, exact), uninterrupted.

Equalities: joint's first loss is frozen's (the same weights and rows); the pool run's losses are
the colocated frozen run's, steps 1-2 (the pool alone) and 3-4 (the pool against the resumed run),
and its exported weights to bf16 rounding.

Printed per run: wall time of the ``train_phase`` call (Ray Train start, loading, steps, export),
tokens/s of its last step, the rank's peak GPU memory next to ``wmss plan``'s estimate; then each
equality with its worst difference. It joins the Ray cluster the environment names
(``RAY_ADDRESS``), else starts a local one; it needs no GPU on the CPU smoke.
"""

from __future__ import annotations

import json
import os
import time

from gpu_check_setup import Setup, Variant, run_config
from gpu_check_steps import max_rel, plan_gib

STEPS = 4
STOP_AT = 2
#: Validation rows (the demo task's eval problems) and new tokens per row.
VALIDATION_ROWS = {"gpu": 8, "cpu": 3}
VALIDATION_NEW_TOKENS = {"gpu": 64, "cpu": 4}
#: The runs, in order: (label, mode, weak model in a pool actor).
RUNS = [("sft", "sft", False), ("joint", "joint", False), ("frozen stopped", "frozen", False),
        ("frozen resumed", "frozen", False), ("frozen pool", "frozen", True)]


def ray_config(s: Setup, mode: str, pool: bool = False):
    """The recipe at world size 1 for one run; colocated ranks take the whole GPU, the pool run
    splits it between the rank (0.5) and the weak model's pool actor (0.5)."""
    gpu = s.on_gpu
    # checkpoints: the recipe's every 200 steps, so each run saves at its end only (and at a stop or
    # a validation point, which also checkpoint)
    extra = ["training.log_every=1",
             f"scaling.cpus_per_worker={4 if gpu else 1}",
             f"evaluation.max_new_tokens={VALIDATION_NEW_TOKENS['gpu' if gpu else 'cpu']}",
             f"evaluation.batch_size={VALIDATION_ROWS['gpu' if gpu else 'cpu']}"]
    if gpu:
        extra.append(f"scaling.gpus_per_worker={0.5 if pool else 1.0}")
    if pool:
        extra += ["mix.placement=pool", "mix.pool.top_k=0", "mix.pool.replicas=1", "mix.pool.shards=1",
                  f"mix.pool.cpus_per_actor={1 if gpu else 0.5}", f"mix.pool.gpus_per_actor={0.5 if gpu else 0}"]
    # the recipe's stage, checkpointing and attention ("auto": flash-attention where installed)
    variant = Variant(mode, mode, zero_stage=2, checkpointing=True, attn="auto")
    return run_config(s, variant, s.micro_batch, extra=extra)


def _validation_points(s: Setup, root: str):
    from wmss_ray.data.synthetic import generate_split
    from wmss_ray.stages.evaluate import load_eval_rows
    from wmss_ray.training.validation import ValidationPoints, write_rows

    cfg = ray_config(s, "sft")
    n = VALIDATION_ROWS["gpu" if s.on_gpu else "cpu"]
    # the recipe reads ids from data.id_column ("id")
    demo = [{"id": r.pop("sample_id"), **r} for r in generate_split("eval", n, 0, cfg.data.demo)]
    rows = load_eval_rows(demo, cfg)
    points = ValidationPoints(every=STOP_AT, rows_path=os.path.join(root, "validation_rows.jsonl"),
                              out_root=os.path.join(root, "sft"))
    write_rows(rows, points.rows_path)
    return points


def _sampled_ids(tokenized: str, n: int, out: str) -> str:
    """The curriculum's output for the WMSS runs: the first ``n`` rows' ids, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = pq.read_table(tokenized, columns=["sample_id"]).column("sample_id").to_pylist()[:n]
    pq.write_table(pa.table({"sample_id": ids}), out)
    return out


def _rank_end(out_dir: str) -> dict:
    """The last ``end`` event the ranks logged (``training.costs.worker_records``: the rank's peak
    GPU memory, its init / resume / train / export seconds)."""
    from wmss_ray.training.costs import worker_records

    ends = [r for r in worker_records(out_dir) if r.get("event") == "end"]
    return ends[-1] if ends else {}


def _validation_summary(step_dir: str) -> dict:
    """What the in-run validation at a step wrote (``eval_results.json``: the model's row)."""
    with open(os.path.join(step_dir, "eval_results.json")) as f:
        (row,) = json.load(f)["models"].values()
    return {k: row.get(k) for k in ("n", "accuracy", "loss", "engine")}


def part_ray(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    from reproducibility import model_weight_diff  # benchmarks/ is on sys.path, as for gpu_check_setup

    from wmss_ray.cluster import ensure_ray
    from wmss_ray.io.files import read_metrics
    from wmss_ray.training.trainer import train_phase

    started = ensure_ray()
    root = os.path.join(s.root, "ray")
    os.makedirs(root, exist_ok=True)
    tokenized = s.paths["fixed"]
    sampled = _sampled_ids(tokenized, STEPS * s.micro_batch, os.path.join(root, "sampled_ids.parquet"))
    points = _validation_points(s, root)
    runs: dict[str, dict] = {}

    def run(label: str, phase: str, mode: str, strong: str, weak: str | None, out: str, pool: bool = False, **kw):
        cfg = ray_config(s, mode, pool=pool)
        t0 = time.perf_counter()
        res = train_phase(cfg, phase, strong, weak, tokenized, sampled if phase == "wmss" else None, out,
                          mode=None if phase == "sft" else mode, exact_steps=STEPS, **kw)
        wall = time.perf_counter() - t0
        metrics = read_metrics(res.metrics_path)  # steps 1 .. this call's last (a resumed run: both calls')
        end = _rank_end(out)
        peak_mb = end.get("peak_gpu_mb")
        runs[label] = {"wall_s": wall, "laps_s": end.get("seconds", {}), "last_step": res.steps,
                       "losses": {m["step"]: m["loss"] for m in metrics}, "tokens_per_s": metrics[-1]["tokens_per_s"],
                       "peak_gib": peak_mb / 1024 if peak_mb else None, "plan_gib": plan_gib(cfg, s.shape, phase),
                       "model_dir": res.model_dir}
        return res

    sft = run("sft", "sft", "sft", s.paths["strong"], None, os.path.join(root, "sft"), validation=points)
    run("joint", "wmss", "joint", sft.model_dir, s.paths["weak"], os.path.join(root, "joint"))
    frozen_dir = os.path.join(root, "frozen")
    run("frozen stopped", "wmss", "frozen", sft.model_dir, s.paths["weak"], frozen_dir, stop_after=STOP_AT)
    frozen = run("frozen resumed", "wmss", "frozen", sft.model_dir, s.paths["weak"], frozen_dir)
    pool = run("frozen pool", "wmss", "frozen", sft.model_dir, s.paths["weak"], os.path.join(root, "frozen_pool"),
               pool=True)

    colocated, pooled = runs["frozen resumed"]["losses"], runs["frozen pool"]["losses"]

    def pool_vs_colocated(steps):
        return max_rel([pooled[k] for k in steps], [colocated[k] for k in steps])

    res = {
        "ray_start": started, "runs": runs, "stopped_at": runs["frozen stopped"]["last_step"],
        "validation": _validation_summary(points.step_dir(STOP_AT)),
        "joint_vs_frozen_step1": abs(runs["joint"]["losses"][1] - colocated[1]),
        "pool_steps": sorted(pooled), "colocated_steps": sorted(colocated),
        "pool_max_rel_before_stop": pool_vs_colocated(range(1, STOP_AT + 1)),
        "pool_max_rel_after_resume": pool_vs_colocated(range(STOP_AT + 1, STEPS + 1)),
        "pool_weights_max_abs": model_weight_diff(frozen.model_dir, pool.model_dir),
    }
    return res, _lines(s, res, points.step_dir(STOP_AT))


def _lines(s: Setup, res: dict, validation_dir: str) -> list[str]:
    runs, val = res["runs"], res["validation"]
    gib = lambda x: f"{x:.1f}" if x is not None else "-"  # noqa: E731
    lines = [f"Ray: {res['ray_start']}; Ray Train, world size 1, {s.shape}, micro-batch {s.micro_batch} x "
             f"{s.seq_len} tokens, the recipe's ZeRO-2 + checkpointing + packing, {STEPS} steps per run (the pool "
             "run: the rank on 0.5 GPU, the weak model's pool actor on 0.5, top_k 0)", "",
             "| run | wall s | rank: init / resume / train / export s | last step | tokens/s (last step) | "
             "peak GiB | wmss plan GiB |", "|---|---:|---|---:|---:|---:|---:|"]
    for label, r in runs.items():
        laps = " / ".join(f"{r['laps_s'].get(k, 0):.1f}" for k in ("init", "resume", "train", "export"))
        lines.append(f"| {label} | {r['wall_s']:.1f} | {laps} | {r['last_step']} | {r['tokens_per_s']:,.0f} | "
                     f"{gib(r['peak_gib'])} | {r['plan_gib']:.1f} |")
    sft = runs["sft"]["wall_s"]
    lines += ["",
              f"- in-run validation at step {STOP_AT} (rank 0 exports, a barrier, every rank generates): "
              f"{val['n']} rows, engine {val['engine']}, accuracy {val['accuracy']} (random weights: the path is "
              f"checked, not the figure); {validation_dir}",
              f"- WMSS from the SFT export: joint's step-1 loss against frozen's (same weights, same rows): "
              f"{res['joint_vs_frozen_step1']:.2e}",
              f"- frozen stopped at step {res['stopped_at']} and resumed from its Ray Train checkpoint; the pool run "
              f"(top_k 0, exact) against it, worst relative loss difference: steps 1-{STOP_AT} "
              f"{res['pool_max_rel_before_stop']:.2e}, steps {STOP_AT + 1}-{STEPS} (after the resume) "
              f"{res['pool_max_rel_after_resume']:.2e}; exported weights, worst absolute difference "
              f"{res['pool_weights_max_abs']:.2e}",
              f"- wall time against SFT's (start-up included): joint {runs['joint']['wall_s'] / sft:.2f}, "
              f"frozen pool {runs['frozen pool']['wall_s'] / sft:.2f}"]
    return lines
