"""benchmarks/gpu_check.py: its dry run validates what the GPU run builds, and every part runs
end to end with tiny shapes on the CPU, both seeing only what a device machine has with the
carried wheels (``device_kit.py as-device``: no Ray there), and the ``ray`` part through Ray Train
on the session's cluster; a variant that does not fit the GPU costs only its own row."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# Not this process's torch.distributed rendezvous (an earlier test's init_single_process set
# MASTER_PORT to a port this process still holds): the check makes its own.
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
ENV = {**{k: v for k, v in os.environ.items() if k not in _DIST_VARS}, "PYTHONPATH": str(REPO)}
KIT = REPO / "benchmarks" / "device_kit.py"
# The script run as on a device machine with the carried wheels: every other package hidden (Ray
# among them), so a wheel the kit lacks fails here, not in the device's few minutes.
AS_ON_DEVICE = [sys.executable, str(KIT), "as-device"]


def test_dry_run_builds_and_validates_every_config_of_the_gpu_run():
    """Issue 26, defect 3: the GPU run's configs failed validation at once on a GPU
    (``scaling.use_gpu`` with ``evaluation.gpus_per_actor: 0``) while ``--dry-run`` ran the CPU
    smoke instead. Now the dry run builds every config as for a GPU (and their DeepSpeed
    configs, and both shapes on the meta device), prints the plan, and touches no GPU."""
    proc = subprocess.run([*AS_ON_DEVICE, str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "every config validated" in out
    assert re.search(r"shape qwen3-0\.6b: 0\.59\d B parameters", out) and re.search(r"shape qwen3-4b: 4\.0\d\d B", out)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check_setup import BIG_VARIANTS, VARIANTS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for shape, variants in (("qwen3-0.6b", VARIANTS), ("qwen3-4b", BIG_VARIANTS)):
        for v in variants:
            assert re.search(rf"^  {re.escape(shape)} {re.escape(v.label)} \| {v.zero_stage} \| .* \| [0-9.]+$", out,
                             flags=re.M), (shape, v.label)


def test_cpu_smoke_runs_every_part_without_ray(tmp_path):
    tmp = tmp_path / "tmp"  # the check's own temp dir: its models must not outlive it (~10 GB on a GPU)
    tmp.mkdir()
    out = tmp_path / "out"
    # vLLM visible too: the engines part runs here where it is installed (the device machines have none)
    proc = subprocess.run([*AS_ON_DEVICE, "--also", "vllm", str(SCRIPT), "--cpu-smoke", "--out-dir", str(out)],
                          capture_output=True, text=True, env={**ENV, "TMPDIR": str(tmp)}, timeout=900)
    text = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    assert proc.returncode == 0 and "FAILED" not in text, (text + proc.stderr)[-4000:]
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("gpu-check-")], list(tmp.iterdir())
    results = json.loads((out / "gpu_check.json").read_text())
    for part in ("steps", "exact", "kernel", "attention", "big", "score_gen", "nccl", "ray", "engines"):
        assert part in results and "error" not in results[part], part
    steps = results["steps"]
    assert [r["label"] for r in steps["plain"]] == ["plain PyTorch SFT", "plain PyTorch SFT ckpt"]
    assert all(r["tokens_per_s"] > 0 and r["plan_gib"] > 0 for r in steps["variants"])
    # the knob variants reach DeepSpeed: bf16 gradients at ZeRO-1 run its ZeRO optimizer, where the
    # shipped fp32 accumulation runs BF16_Optimizer (engine._do_optimizer_sanity_check)
    by = {r["label"]: r for r in steps["variants"]}
    assert by["sft z1"]["optimizer"] == "BF16_Optimizer", by["sft z1"]
    assert by["sft z1 bf16 grads"]["optimizer"] == "DeepSpeedZeroOptimizer", by["sft z1 bf16 grads"]
    assert "data_types.grad_accum_dtype=bf16" in by["sft z1 bf16 grads"]["ds"]
    # compared with the step it changes: same first loss (same weights and rows), a figure in the text
    assert by["sft z1 bf16 grads"]["losses"][0] == by["sft z1"]["losses"][0]
    assert 0 <= by["sft z1 bf16 grads"]["loss_vs_base"] < 0.1
    assert "sft z1 bf16 grads against sft z1: step time" in text
    # training.autocast reaches the step: the ZeRO optimizer over fp32 weights, compared with bf16 weights
    assert by["sft z2 autocast"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert 0 <= by["sft z2 autocast"]["loss_vs_base"] < 0.05
    assert "sft z2 autocast against sft z2: step time" in text
    # flash-attention's variants run where flash-attn is installed on a GPU, else are skipped, and said
    assert "sft z1 flash" not in by and "needs a CUDA device" in steps["skipped"]["sft z1 flash"]
    assert "| sft z1 flash | skipped: " in text
    profiled = [r for r in steps["variants"] if r["profile"]]
    assert profiled and (out / profiled[0]["profile"]["file"]).exists()
    exact = results["exact"]
    assert exact["rope_fp32_and_equal"] and exact["export_logit_max_rel"] < 1e-6
    assert exact["packing_max_rel"] < 1e-3 and exact["resume_max_rel"] < 1e-6  # fp32 CPU math, bf16 weights
    assert exact["resumed_from"] == 2 and len(exact["losses_resumed"]) == 2
    kernel = {r["impl"].split(" (")[0]: r for r in results["kernel"]["rows"]}
    assert kernel.keys() == {"naive", "chunked"}
    assert all(r["loss_rel_err"] < 1e-2 and r["grad_rel_err"] < 5e-2 for r in results["kernel"]["rows"])
    # packed rows' attention: the block mask (what sdpa runs) timed; the varlen kernels are CUDA only
    attention = {r["variant"]: r for r in results["attention"]["results"]}
    assert attention.keys() == {"sdpa causal", "sdpa block mask"} and attention["sdpa block mask"]["fwd_bwd_ms"] > 0
    assert "| sdpa block mask |" in text and "CUDA only" in text
    assert results["score_gen"]["score_rows_per_s"] > 0 and results["score_gen"]["gen_new_tokens_per_s"] > 0
    assert results["ray"]["skipped"] and "Ray is not installed" in text  # run below, on the session's cluster
    # two spawned ranks (gloo here, NCCL on 2 GPUs): the same losses on both, and as one rank with grad_accum 2
    ranks = results["nccl"]
    assert ranks["backend"] == "gloo" and ranks["ranks_agree"] and ranks["busbw_gb_s"] > 0
    assert len(ranks["losses"]) == 2 and ranks["max_rel_vs_1_rank"] < 1e-3, ranks
    assert ranks["grad_norm_max_rel_vs_1_rank"] < 1e-2, ranks
    # HF generate vs vLLM (benchmarks/generation.py, each in a child process): both did the same work
    (engines,) = results["engines"]["rows"]
    assert engines["shape"] == "tiny" and engines["new_tokens"] == {"hf": 2 * 2 * 4, "vllm": 2 * 2 * 4}
    assert engines["hf"]["steady_completions_per_s"] > 0 and engines["vllm"]["start_s"] > 0
    assert "| tiny | vllm |" in text


@pytest.fixture(scope="module")
def smoke_setup(tmp_path_factory):
    """The CPU smoke's setup, its models and rows prepared (as the check does before its parts)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check

        s = gpu_check.make_setup(gpu_check.parse_args(["--cpu-smoke"]), str(tmp_path_factory.mktemp("smoke_root")))
        gpu_check.prepare(s)
        yield s
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_ray_part_trains_validates_resumes_and_pools_through_ray_train(ray_cluster, smoke_setup, tmp_path,
                                                                          monkeypatch):
    """The ``ray`` part (skipped above, where Ray is missing) on the session's cluster, as on a GPU
    node: five Ray Train runs of ``train_phase``; in-run validation wrote its files, WMSS starts from
    the SFT export, the exact pool equals colocated frozen before and after the latter's resume."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from gpu_check_parts import part_ray

    s = smoke_setup
    res, lines = part_ray(s, str(tmp_path / "out"))
    runs = res["runs"]
    assert [(label, r["last_step"]) for label, r in runs.items()] == [
        ("sft", 4), ("joint", 4), ("frozen stopped", 2), ("frozen resumed", 4), ("frozen pool", 4)]
    assert all(sorted(r["losses"]) == list(range(1, r["last_step"] + 1)) for r in runs.values())
    assert all(r["wall_s"] > 0 and r["tokens_per_s"] > 0 and r["plan_gib"] > 0 for r in runs.values())
    # in-run validation at step 2 of the SFT run (export, barrier, generation on the rank)
    assert res["validation"]["n"] == 3 and res["validation"]["engine"] == "hf"
    assert (Path(s.root) / "ray" / "sft" / "validation_step2" / "eval_WMSS.jsonl").exists()
    # the same weights give joint and frozen the same first loss; then the weak model trains in joint only
    assert res["joint_vs_frozen_step1"] == 0.0 and runs["joint"]["losses"][4] != runs["frozen resumed"]["losses"][4]
    # the resumed run's steps 3-4 came from its checkpoint, and the exact pool gives its losses throughout
    assert res["stopped_at"] == 2 and res["colocated_steps"] == res["pool_steps"] == [1, 2, 3, 4]
    assert res["pool_max_rel_before_stop"] < 1e-4 and res["pool_max_rel_after_resume"] < 1e-4, res
    assert res["pool_weights_max_abs"] < 1e-2, res
    text = "\n".join(lines)
    assert "| frozen pool |" in text and "after the resume" in text


def test_a_variant_that_does_not_fit_the_device_is_reported_and_the_rest_still_run(smoke_setup, tmp_path,
                                                                                    monkeypatch):
    """An 80 GB card (the device kind lent first) does not hold every 4B variant a 141 GB one
    did: the variant that runs out of memory mid-step is a row that says so, next to ``wmss plan``,
    its engine is let go (collected: its memory comes back), and the variants after it run."""
    import dataclasses
    import gc
    import weakref

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from gpu_check_setup import Variant
    from gpu_check_steps import part_big

    from wmss_ray.training.worker import PhaseWorker, init_single_process

    init_single_process()  # as the check's main does (a 1-rank gloo group here)
    died, real_step = [], PhaseWorker.train_step

    def train_step(self, step):
        if self.spec.mode == "frozen":
            died.append(weakref.ref(self))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total "
                                              "capacity of 79.19 GiB of which 1.05 GiB is free.")
        return real_step(self, step)

    monkeypatch.setattr(PhaseWorker, "train_step", train_step)
    s = dataclasses.replace(smoke_setup, big_variants=[Variant("frozen z3 ckpt", "frozen", 3, True),
                                                       Variant("sft z2 ckpt", "sft", 2, True)])
    res, lines = part_big(s, str(tmp_path))
    assert [r["label"] for r in res["variants"]] == ["sft z2 ckpt"] and res["variants"][0]["tokens_per_s"] > 0
    (oom,) = res["out_of_memory"]
    assert oom["label"] == "frozen z3 ckpt" and "Tried to allocate 2.32 GiB" in oom["oom"] and oom["plan_gib"] > 0
    gc.collect()
    assert died and died[0]() is None  # the dead variant's worker (its engine, its weights) was collected
    assert re.search(r"^\| frozen z3 ckpt \| out of memory: .*wmss plan [0-9.]+ GiB( \|)+$", "\n".join(lines), re.M)


def test_the_check_refuses_to_start_without_a_gpu_unless_told():
    if torch.cuda.is_available():  # pragma: no cover - on a GPU machine the real check would start
        pytest.skip("a GPU is present: the check would run for real")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and "--cpu-smoke" in proc.stderr
