"""GPU check of the real training path, one invocation on one GPU (about 6 minutes on an H200).

It runs what users run (every part but ``ray`` without Ray: the device machines carry none): the
shipped recipe ``configs/qwen3-4b-math.yaml`` with per-variant overrides, models written to disk
as HF directories and loaded by the project's loader (ZeRO-3: ``zero.Init`` + scattered weights),
the project's training rank :class:`~wmss_ray.training.worker.PhaseWorker`
(DeepSpeed engine over the pair module, packing, the chunked mixed CE), its checkpoint, export
and reload. Random-init Qwen3 models (no model hub): the 0.6B shape end to end, the 4B shape for
memory and speed. Parts, in this order, each skipped when the time budget is spent:

- ``steps``: SFT, WMSS frozen and joint at ZeRO 1/2/3 with and without activation checkpointing,
  beside a plain PyTorch SFT step on the same rows (fp32 master weights under bf16 autocast,
  fused AdamW): tokens/s, MFU, the ratio to the plain step, peak memory next to ``wmss plan``'s
  estimate, WMSS/SFT step ratios, and a torch.profiler breakdown of some variants; SFT again with
  DeepSpeed's own knobs (bf16 gradients, overlapped reduction) against the engine's host overheads,
  and with flash-attention's varlen kernel (where installed) against sdpa's packed mask;
- ``exact``: packing on vs off per-step losses, ``grad_accum`` 2, a checkpoint resumed in a fresh
  rank, the export reloaded (fp32 rotary tables, logits over twice the row length);
- ``kernel``: the chunked mixed CE against the naive loss at the default and the recipe's chunk;
- ``big``: the 4B shape, plain vs ours, peak memory vs ``wmss plan``;
- ``attention``: one attention layer on packed rows, sdpa's block mask against flash-attn's varlen
  kernel (where installed), PyTorch's own varlen kernel and flex attention (``packed_attention.py``);
- ``score_gen``: entropy scoring and HF generation throughput;
- ``engines``: HF ``generate`` against vLLM (``benchmarks/generation.py``) at both shapes, when
  vLLM is installed (the project's GPU image; not the device machines this project is lent);
- ``nccl``: 2 ranks over NCCL when the machine has 2 GPUs (gloo on the CPU smoke; skipped, and said,
  with one GPU): all-reduce bus bandwidth, ZeRO-2 SFT tokens/s per GPU, losses against one rank with
  the same global batch (``gpu_check_ranks.py``);
- ``ray``: where Ray is installed (a user's GPU node; not the device machines), the same path through
  Ray Train as ``wmss run`` drives it (``gpu_check_ray.py``): SFT with in-run validation; from its
  export WMSS joint, frozen stopped and resumed from its checkpoint, and frozen with the weak model in
  a pool actor on half the GPU.

Usage::

    python benchmarks/gpu_check.py --out-dir results/        # on a GPU
    python benchmarks/gpu_check.py --dry-run                 # any machine: build and validate, print the plan
    python benchmarks/gpu_check.py --cpu-smoke --out-dir d/  # tiny shapes on the CPU (a test)
    python benchmarks/device_kit.py calls                    # on a lent device machine: its wheels and calls

A variant that runs out of GPU memory is reported as such (beside ``wmss plan``) and the next ones run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_check_setup import BF16_GRADS, FLASH, SHAPES, Setup, Variant, run_config, save_model, write_rows  # noqa: E402

#: Rough seconds each part takes on an H200 (for the budget: a part that would not fit is skipped;
#: exact measured 146 s there on 2026-12-04, steps 205 s before four more variants).
GPU_SECONDS = {"steps": 300, "exact": 150, "kernel": 15, "big": 150, "attention": 60, "score_gen": 40, "nccl": 60,
               "ray": 150, "engines": 240}
ORDER = ["steps", "exact", "kernel", "big", "attention", "score_gen", "nccl", "ray", "engines"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="build and validate every config and model shape of the GPU run (no GPU touched), "
                           "print the plan, exit")
    mode.add_argument("--cpu-smoke", action="store_true", help="every part with tiny shapes on the CPU (a test)")
    p.add_argument("--parts", default=",".join(ORDER), help=f"comma-separated subset of {ORDER}")
    p.add_argument("--budget-s", type=float, default=420, help="skip parts that would end after this many seconds")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--big-micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out-dir", default=None, help="write gpu_check.md, gpu_check.json and profiles here")
    a = p.parse_args(argv)
    a.parts = [x for x in a.parts.split(",") if x]
    unknown = set(a.parts) - set(ORDER)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; known: {ORDER}")
    if not (a.dry_run or a.cpu_smoke) and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --dry-run (plan only) or --cpu-smoke (tiny CPU run)")
    return a


def make_setup(a, root: str) -> Setup:
    if a.cpu_smoke:
        return Setup(device=torch.device("cpu"), root=root, shape="tiny", big_shape="tiny-big", seq_len=64,
                     micro_batch=2, big_micro_batch=2, warmup=1, steps=1, exact_steps=4, loss_tokens=256,
                     loss_chunks=[64], gen_batch=2, gen_new_tokens=4,
                     variants=[Variant("sft z2", "sft", 2, False, profile=True),
                               Variant("frozen z2", "frozen", 2, False), Variant("sft z1", "sft", 1, False),
                               Variant("sft z1 bf16 grads", "sft", 1, False, ds=BF16_GRADS),
                               Variant("sft z2 autocast", "sft", 2, False, autocast=True),
                               Variant("sft z1 flash", "sft", 1, False, attn=FLASH),  # skipped: no CUDA
                               Variant("sft z3 ckpt", "sft", 3, True)],
                     big_variants=[Variant("sft z2 ckpt", "sft", 2, True)])
    return Setup(device=torch.device("cuda"), root=root, shape="qwen3-0.6b", big_shape="qwen3-4b", seq_len=a.seq_len,
                 micro_batch=a.micro_batch, big_micro_batch=a.big_micro_batch, warmup=a.warmup, steps=a.steps,
                 exact_steps=4, loss_tokens=8192, loss_chunks=[2048, 4096, 8192], gen_batch=64, gen_new_tokens=128)


def dry_run(a) -> int:
    """Build and validate what the GPU run would (configs as for a GPU, shapes on the meta device,
    DeepSpeed configs, ``wmss plan`` figures) and print the plan; no CUDA call is made."""
    from gpu_check_steps import n_params, plan_gib

    from wmss_ray.training.ds_config import build_ds_config

    s = make_setup(a, root="<tmp>")
    print(f"GPU check plan: parts {a.parts}, budget {a.budget_s:.0f} s; recipe configs/qwen3-4b-math.yaml")
    for shape in (s.shape, s.big_shape):
        print(f"  shape {shape}: {n_params(shape) / 1e9:.3f} B parameters, vocab {SHAPES[shape]['vocab_size']}")
    print(f"  rows: {s.seq_len} tokens; micro-batch {s.micro_batch} ({s.big_micro_batch} at {s.big_shape})")
    print("  variant | ZeRO | ckpt | packing | attention, DeepSpeed overrides | wmss plan GiB per GPU")
    for shape, mb, variants in ((s.shape, s.micro_batch, s.variants),
                                (s.big_shape, s.big_micro_batch, s.big_variants)):
        for v in variants:
            cfg = run_config(s, v, mb)
            assert cfg.scaling.use_gpu, "the dry run validates the configs as the GPU run builds them"
            build_ds_config(cfg.training, 1, torch.bfloat16, True)
            phase = "sft" if v.mode == "sft" else "wmss"
            print(f"  {shape} {v.label} | {v.zero_stage} | {v.checkpointing} | {v.packing} | "
                  f"{', '.join([v.attn, *v.ds])} | {plan_gib(cfg, shape, phase):.1f}")
    print(f"  exact: joint ZeRO-3 + ckpt, grad_accum 2, {s.exact_steps} steps, packing on/off, resume, export")
    print(f"  attention: one layer of {s.shape}, {s.micro_batch} packed rows x {s.seq_len}: sdpa block mask, "
          "flash-attn varlen (if installed), torch varlen, flex document mask")
    two = run_config(s, Variant("sft z2", "sft", 2, False), s.micro_batch, extra=["scaling.num_workers=2"])
    build_ds_config(two.training, 2, torch.bfloat16, True)
    print(f"  nccl: 2 spawned ranks (2 GPUs, else skipped), all-reduce + ZeRO-2 SFT, micro-batch {s.micro_batch} "
          "per rank, against one rank with grad_accum 2")
    from gpu_check_ray import RUNS, STEPS, ray_config

    for _, mode, pool in RUNS:
        assert ray_config(s, mode, pool).scaling.use_gpu
    try:
        import ray  # noqa: F401

        has_ray = "installed"
    except ImportError:
        has_ray = "not installed: skipped"
    print(f"  ray: Ray Train at world size 1, {STEPS} steps per run: {', '.join(label for label, _, _ in RUNS)} "
          f"(the pool run: rank and pool actor on 0.5 GPU each; Ray {has_ray})")
    from wmss_ray.models.vllm_engine import vllm_installed

    print(f"  engines: HF generate vs vLLM at {s.shape} and {s.big_shape}, {2 * s.gen_batch} prompts x "
          f"{s.gen_new_tokens} new tokens (vLLM {'installed' if vllm_installed() else 'not installed: skipped'})")
    print("dry run: every config validated; nothing was run")
    return 0


def prepare(s: Setup) -> None:
    """Models (strong seed 1, weak seed 2) and tokenised rows on disk, as the pipeline leaves them."""
    vocab = SHAPES[s.shape]["vocab_size"]
    s.paths["strong"] = save_model(s.shape, 1, os.path.join(s.root, "strong"), s.device)
    s.paths["weak"] = save_model(s.shape, 2, os.path.join(s.root, "weak"), s.device)
    n_fixed = max(4 * s.micro_batch, s.big_micro_batch) * (s.warmup + s.steps + 2)
    s.paths["fixed"] = write_rows(os.path.join(s.root, "rows_fixed"), n_fixed, s.seq_len, vocab, 0, False)
    s.paths["variable"] = write_rows(os.path.join(s.root, "rows_variable"), 2 * s.micro_batch * s.exact_steps,
                                     s.seq_len, vocab, 1, True)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dry_run:
        return dry_run(a)
    t_start = time.perf_counter()
    out_dir = a.out_dir or tempfile.mkdtemp(prefix="gpu-check-out-")
    os.makedirs(out_dir, exist_ok=True)
    # the models and rows the parts train on (on a GPU: the 0.6B and 4B shapes, ~10 GB): removed at
    # the end, whatever happened (the report in out_dir stays)
    root = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        return _run(a, argv, out_dir, root, t_start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(a, argv, out_dir: str, root: str, t_start: float) -> int:
    from gpu_check_parts import PARTS

    from wmss_ray.training.worker import init_single_process

    s = make_setup(a, root)
    init_single_process(backend="nccl" if s.on_gpu else "gloo")
    name = torch.cuda.get_device_name() if s.on_gpu else "CPU (smoke run: the figures mean nothing)"
    import transformers

    head = [f"# GPU check\n\nCommand: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
            f"Device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
            f"DeepSpeed {__import__('deepspeed').__version__}; attention sdpa"]
    prepare(s)
    results: dict = {"setup": {"shape": s.shape, "big_shape": s.big_shape, "seq_len": s.seq_len,
                               "micro_batch": s.micro_batch, "prepare_s": time.perf_counter() - t_start}}
    sections: list[str] = []
    for part in [p for p in ORDER if p in a.parts]:
        elapsed = time.perf_counter() - t_start
        need = GPU_SECONDS[part] if s.on_gpu else 0
        if elapsed + need > a.budget_s:
            sections.append(f"## {part}\n\nskipped: {elapsed:.0f} s spent, about {need} s needed, budget "
                            f"{a.budget_s:.0f} s")
            continue
        t0 = time.perf_counter()
        try:
            res, lines = PARTS[part](s, out_dir)
            res["seconds"] = time.perf_counter() - t0
            results[part] = res
            sections.append(f"## {part} ({res['seconds']:.0f} s)\n\n" + "\n".join(lines))
        except Exception as exc:  # one broken part must not cost the others (the device time is short)
            results[part] = {"error": repr(exc)}
            sections.append(f"## {part}\n\nFAILED: {exc!r}\n\n```\n{traceback.format_exc()[-3000:]}\n```")
        print(sections[-1], flush=True)
        _write(out_dir, head, sections, results, t_start)
    text = _write(out_dir, head, sections, results, t_start)
    print("\n" + text)
    failed = [p for p, r in results.items() if isinstance(r, dict) and "error" in r]
    return 1 if failed else 0


def _write(out_dir: str, head: list[str], sections: list[str], results: dict, t_start: float) -> str:
    text = "\n\n".join(head + sections) + f"\n\nWall time of the check: {time.perf_counter() - t_start:.0f} s\n"
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(results, f, default=float, indent=1)
    return text


if __name__ == "__main__":
    sys.exit(main())
