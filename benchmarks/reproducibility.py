"""Does the same seed give the same models? Two runs of one config, compared phase by phase.

Same machine: the pipeline runs twice (``<storage>/rep_a``, ``<storage>/rep_b``, same seed) and
every phase's outputs are compared exactly: model weights tensor by tensor, parquet tables
(row order included), per-step losses, per-problem eval outcomes. The first phase whose outputs
differ is where two runs diverge.

Across machines, emulated here: phase 0 from the same seed with 1 and 2 threads and with torch's
and MKL's AVX2 kernels instead of AVX-512 (CPU type and thread count can change the order of
float reductions), then each M0's final loss, held-out loss and largest weight difference.

Usage::

    python benchmarks/reproducibility.py --storage /tmp/rep [--config configs/test-tiny.yaml]
        [--threads-steps 30] [--skip-pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wmss_ray.config.schema import WMSSConfig  # noqa: E402

from wmss_ray.config.loading import config_from_dict, load_config

TINY = Path(__file__).resolve().parent.parent / "configs" / "test-tiny.yaml"
# per-step metrics that are measurements of time, not results
_TIMING = {"tokens_per_s", "step_time", "seconds", "elapsed_s"}


def model_weight_diff(a: str | Path, b: str | Path) -> float:
    """Largest absolute weight difference of two exported models (their ``*.safetensors`` files,
    sharded or not): 0.0 when bit-identical, ``inf`` when they hold different tensor names."""
    import torch
    from safetensors.torch import load_file

    def weights(d: str | Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(Path(d).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    wa, wb = weights(a), weights(b)
    if not wa or wa.keys() != wb.keys():
        return float("inf")
    return max(0.0 if torch.equal(wa[k], wb[k]) else (wa[k].double() - wb[k].double()).abs().max().item()
               for k in wa)


def _jsonl(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in _TIMING and k != "model_dir"} for r in rows]


def compare_phase(phase: str, a: Path, b: Path) -> list[str]:
    """Differences between the outputs of one phase in two run dirs (empty: identical)."""
    import pyarrow.parquet as pq

    diffs = []
    for fa in sorted(p for p in a.rglob("*") if p.is_file()):
        rel = fa.relative_to(a)
        fb = b / rel
        if any(part in ("ray_train", "tb", "_tokenize_index") for part in rel.parts) or rel.name.endswith(
                ("manifest.json", ".png", ".html", "report_data.json", "workers.jsonl")):
            continue  # checkpoints, logs and timings; the results they hold are compared below
        if not fb.exists():
            diffs.append(f"{rel}: only in the first run")
        elif fa.suffix == ".safetensors":
            d = model_weight_diff(fa.parent, fb.parent)
            if d:
                diffs.append(f"{rel}: max |dw| = {d:.3g}")
        elif fa.suffix == ".parquet":
            if not pq.read_table(fa).equals(pq.read_table(fb)):
                diffs.append(f"{rel}: tables differ")
        elif fa.suffix == ".jsonl":
            if _jsonl(fa) != _jsonl(fb):
                diffs.append(f"{rel}: rows differ")
        elif rel.name == "phase0_metrics.json":
            ma, mb = json.loads(fa.read_text()), json.loads(fb.read_text())
            if ma["losses"] != mb["losses"]:
                diffs.append(f"{rel}: losses differ")
        elif fa.suffix in (".json", ".yaml", ".txt", ".jinja") and fa.name != "config.yaml":
            if fa.read_bytes() != fb.read_bytes() and rel.name != "eval_results.json":
                diffs.append(f"{rel}: bytes differ")
    return diffs


def same_seed_twice(cfg: WMSSConfig, storage: Path) -> list[tuple[str, list[str]]]:
    from wmss_ray.pipeline import build_phases, run_pipeline

    runs = []
    for name in ("rep_a", "rep_b"):
        c = config_from_dict(cfg.to_dict(), [f"run.storage={storage}", f"run.name={name}"])
        run_pipeline(c)
        runs.append(Path(c.run_dir()))
    return [(p.name, compare_phase(p.name, runs[0] / p.name, runs[1] / p.name)) for p in build_phases(cfg)]


# "Another machine", emulated on this one: thread count, and the CPU kernels torch and MKL pick
# (AVX2 instead of AVX-512 stands in for an older or different x86 CPU).
VARIANTS: dict[str, dict[str, str]] = {
    "1 thread": {"THREADS": "1"},
    "2 threads": {"THREADS": "2"},
    "1 thread, AVX2 kernels": {"THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def phase0_spread(cfg: WMSSConfig, storage: Path, steps: int, variants: list[str] | None = None) -> dict[str, Any]:
    """Phase 0 of ``cfg`` (``steps`` steps, same seed) under each of ``VARIANTS``, each in a fresh
    process (kernel choice is fixed at start-up); final train loss, M0's held-out loss and
    accuracy (in this process, so only phase 0 differs), and max |dw| against the first."""
    import subprocess

    from wmss_ray.data.synthetic import generate_split
    from wmss_ray.stages.evaluate import evaluate_model

    eval_rows = generate_split("eval", cfg.data.demo.n_eval, cfg.run.seed, cfg.data.demo)
    out: dict[str, Any] = {}
    for name, env in ((n, VARIANTS[n]) for n in variants or VARIANTS):
        model = storage / ("phase0_" + "".join(c if c.isalnum() else "_" for c in name))
        env = {**os.environ, **env}
        subprocess.run([sys.executable, __file__, "--phase0-worker", str(model), "--config", cfg_path(cfg, storage),
                        "--threads-steps", str(steps)], env=env, check=True)
        metrics = json.loads((model / "phase0_metrics.json").read_text())
        res = evaluate_model(str(model), eval_rows, cfg, name="M0", use_ray=False)
        out[name] = {"final_loss": metrics["final_loss"], "eval_loss": res.loss, "eval_accuracy": res.accuracy,
                     "model": model, "threads": metrics["threads"]}
    first = next(iter(out.values()))["model"]
    for v in out.values():
        v["max_abs_weight_diff"] = model_weight_diff(first, v["model"])
    return out


def cfg_path(cfg: WMSSConfig, storage: Path) -> str:
    from wmss_ray.config.loading import save_config

    path = storage / "phase0_config.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return str(path)


def _phase0_worker(out: str, config: str, steps: int) -> None:
    from wmss_ray.training.pretrain import pretrain_base

    cfg = load_config(config, [f"phase0.num_threads={os.environ.get('THREADS', '1')}", f"phase0.steps={steps}"])
    pretrain_base(cfg, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(TINY))
    ap.add_argument("--storage", default="runs/reproducibility")
    ap.add_argument("--threads-steps", type=int, default=30, help="phase-0 steps of the 1-vs-2-thread comparison")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the phase-0 variants")
    ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS), help="phase-0 variants (default: all)")
    ap.add_argument("--phase0-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase0_worker:
        _phase0_worker(args.phase0_worker, args.config, args.threads_steps)
        return 0
    cfg, storage = load_config(args.config), Path(args.storage).resolve()
    if not args.skip_pipeline:
        from wmss_ray.pipeline import ensure_ray

        ensure_ray()
        print("same seed, same machine, two runs:")
        for phase, diffs in same_seed_twice(cfg, storage):
            print(f"  {phase:<13} {'identical' if not diffs else 'DIFFERS: ' + '; '.join(diffs[:4])}", flush=True)
    print(f"phase 0, {args.threads_steps} steps, same seed ({Path(args.config).name}); M0 on its {cfg.data.demo.n_eval} eval problems:")
    for name, v in phase0_spread(cfg, storage, args.threads_steps, args.variants).items():
        print(f"  {name:<24} threads {v['threads']}, final train loss {v['final_loss']:.5f}, held-out loss "
              f"{v['eval_loss']:.6f}, accuracy {v['eval_accuracy']:.4f}, max |dw| vs first {v['max_abs_weight_diff']:.3g}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
