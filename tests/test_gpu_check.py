"""benchmarks/gpu_check.py runs end to end (tiny shape on the CPU); the real check needs a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.md"
    # Not this process's torch.distributed rendezvous (an earlier test's init_single_process set
    # MASTER_PORT to a port this process still holds): the check makes its own.
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for mode in ("sft", "frozen", "joint"):
        assert re.search(rf"^\| {mode} \| bfloat16 \|", text, flags=re.M), mode
    diff = float(re.search(r"bf16 vs fp32, \d+ steps: max relative difference ([0-9.e+-]+)", text).group(1))
    assert diff < 1e-2  # bf16 and fp32 runs of the same init and batches agree
    rows = re.findall(r"^\| (naive|chunked[^|]*) \| [0-9.]+ \| [^|]+ \| ([0-9.e+-]+) \| ([0-9.e+-]+) \|$", text, flags=re.M)
    assert len(rows) == 3 and all(float(loss) < 1e-2 and float(grad) < 5e-2 for _, loss, grad in rows)


def test_gpu_check_refuses_to_run_without_a_gpu_unless_smoke():
    import pytest
    import torch

    if torch.cuda.is_available():  # pragma: no cover - on a GPU machine the real check would start
        pytest.skip("a GPU is present: the check would run for real")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr
