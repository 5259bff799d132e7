"""The two-rank part of ``benchmarks/gpu_check.py``: two processes, one GPU each, over NCCL (gloo on
the CPU smoke), running the project's training rank (``PhaseWorker``) as a Ray Train worker would.

- the all-reduce bus bandwidth of the pair (bf16, 256 MiB on GPUs);
- SFT at ZeRO-2 on both ranks, micro-batch m each: per-GPU tokens/s, and per-step losses against
  one rank running the same global batch as m x grad_accum 2 (the same rows in the same order:
  ``DataPlan.for_world``), so the collective path is checked for exactness, not only for speed.

The ranks are spawned (a CUDA process cannot fork); each writes its figures to a JSON file.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch

from wmss_ray.cluster import free_port

from gpu_check_setup import Setup, Variant, free, make_worker
from gpu_check_steps import max_rel, sync

#: A rank pair that has not finished after this long is stuck (a tiny run takes seconds).
DEADLINE_S = 600
WORLD = 2


def allreduce_busbw(s: Setup, device: torch.device, numel: int, iters: int) -> float:
    """Bus bandwidth (bytes/s) of a bf16 all-reduce of ``numel`` elements: the algorithm bandwidth
    times 2(n-1)/n (NCCL tests' convention, 1 for two ranks)."""
    import torch.distributed as dist

    x = torch.ones(numel, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        dist.all_reduce(x)
    sync(s)  # this rank's device (set_device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    sync(s)
    seconds = (time.perf_counter() - t0) / iters
    n = dist.get_world_size()
    return x.numel() * x.element_size() / seconds * 2 * (n - 1) / n


def rank_main(rank: int, s: Setup, port: int, out: str, n_steps: int, first_gpu: int) -> None:
    """One spawned rank on GPU ``first_gpu + rank``: the process group, the all-reduce, the ZeRO-2
    SFT steps; figures to ``<out>/rank<rank>.json``."""
    import torch.distributed as dist

    # the parent's single-process group left these in the environment the spawn copied
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    device = torch.device("cuda", first_gpu + rank) if s.on_gpu else torch.device("cpu")
    if s.on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if s.on_gpu else "gloo", rank=rank, world_size=WORLD)
    busbw = allreduce_busbw(s, device, (256 << 20) // 2 if s.on_gpu else 1 << 16, 10 if s.on_gpu else 3)
    worker, _ = make_worker(s, Variant("sft z2", "sft", 2, False), s.paths["strong"], None, s.paths["fixed"],
                            n_steps, s.micro_batch, out_dir=tempfile.mkdtemp(prefix=f"rank{rank}-", dir=out),
                            rank=rank, world=WORLD, device=device)
    losses, norms, times = [], [], []
    for step in range(n_steps):
        t0 = time.perf_counter()
        m = worker.train_step(step)  # synchronises the device at its end
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"busbw": busbw, "losses": losses, "grad_norms": norms, "times": times,
                   "backend": dist.get_backend()}, f)
    dist.barrier()
    os._exit(0)  # no process-group teardown: the pair is done (gloo's can hang at exit)


def part_ranks(s: Setup, out_dir: str) -> tuple[dict, list[str]]:
    """Two ranks (NCCL on two GPUs, gloo on the CPU smoke) against one rank with grad_accum 2."""
    import torch.multiprocessing as mp

    n_gpus = torch.cuda.device_count() if s.on_gpu else 0
    if s.on_gpu and n_gpus < WORLD:
        return {"skipped": True}, [f"NCCL with 2 ranks: skipped ({n_gpus} GPU on this machine)."]
    n_steps = s.warmup + s.steps
    # the reference: one rank, the same global batch as micro-batch x grad_accum 2
    ref, _ = make_worker(s, Variant("sft z2", "sft", 2, False), s.paths["strong"], None, s.paths["fixed"], n_steps,
                         s.micro_batch, grad_accum=WORLD)
    ref_metrics = [ref.train_step(step) for step in range(n_steps)]
    ref_losses, ref_norms = [m["loss"] for m in ref_metrics], [m["grad_norm"] for m in ref_metrics]
    ref.engine.destroy()
    del ref
    free()
    out = tempfile.mkdtemp(prefix="gpu-check-ranks-", dir=s.root)
    # GPU 0 holds what this process kept from the earlier parts: the pair starts at GPU 1 when it can
    first_gpu = 1 if n_gpus > WORLD else 0
    ctx = mp.start_processes(rank_main, args=(s, free_port(), out, n_steps, first_gpu), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=5):  # raises when a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the two ranks did not finish in {DEADLINE_S} s")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]
    losses = ranks[0]["losses"]
    step_s = statistics.median(max(r["times"][i] for r in ranks) for i in range(s.warmup, n_steps))
    res = {"backend": ranks[0]["backend"], "busbw_gb_s": min(r["busbw"] for r in ranks) / 1e9,
           "step_s": step_s, "tokens_per_s_per_rank": s.micro_batch * s.seq_len / step_s,
           "ranks_agree": ranks[0]["losses"] == ranks[1]["losses"], "losses": losses, "losses_1_rank": ref_losses,
           "max_rel_vs_1_rank": max_rel(losses, ref_losses),
           # Adam's update does not see a uniform gradient scale (a sum for a mean): the norms do
           "grad_norm_max_rel_vs_1_rank": max_rel(ranks[0]["grad_norms"], ref_norms)}
    where = f"GPUs {first_gpu} and {first_gpu + 1}" if s.on_gpu else "CPU smoke"
    lines = [f"Two ranks over {res['backend']} ({where}):",
             f"- all-reduce (bf16, {'256 MiB' if s.on_gpu else '128 KiB'}): bus bandwidth {res['busbw_gb_s']:.3g} GB/s",
             f"- SFT ZeRO-2, micro-batch {s.micro_batch} x {s.seq_len} per rank: step {step_s:.3f} s, "
             f"{res['tokens_per_s_per_rank']:,.0f} tokens/s per GPU (one GPU: `sft z2` of the step matrix)",
             f"- losses: both ranks report the same: {res['ranks_agree']}; against one rank with grad_accum 2 "
             f"(the same rows): worst relative difference {res['max_rel_vs_1_rank']:.1e} over {n_steps} steps, "
             f"gradient norms {res['grad_norm_max_rel_vs_1_rank']:.1e}"]
    return res, lines
