"""``wmss plan``'s activation terms against what real HF models keep, per token: prints the tables
of BENCHMARKS.md ("`wmss plan`: eager attention and the frozen transient, measured").

The measurement is the one tests/test_plan_activations.py asserts on (its ``_MEASURE``, run here in a
fresh interpreter as there): autograd's saved tensors of a trained forward, and, for a frozen
model, the peak of every live storage but the weights during a no-grad forward (torch's
``MemTracker``), tiny Qwen3 and Llama models on the CPU, batch 2 minus batch 1.

Usage::

    python benchmarks/plan_activations.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_plan_activations import _MEASURE, SEQ, _tiny_shape  # noqa: E402
from wmss_ray.plan.activations import activation_bytes  # noqa: E402



def main() -> None:
    proc = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| model | precision | eager's share, trained: measured | plan |\n|---|---|---:|---:|")
    for arch in ("qwen3", "llama"):
        s = _tiny_shape(arch)
        for prec in ("bf16", "fp32", "autocast"):
            act_b, auto = (2 if prec == "bf16" else 4), prec == "autocast"
            plan = (activation_bytes(s, SEQ, SEQ, 1, act_b, checkpointing=False, eager=True, autocast=auto)
                    - activation_bytes(s, SEQ, SEQ, 1, act_b, checkpointing=False, eager=False, autocast=auto)) / SEQ
            measured = out[f"{arch} {prec} eager"] - out[f"{arch} {prec} False"]
            print(f"| {arch} | {prec} | {measured:,.0f} | {plan:,.0f} |")
    print("\n| model | precision | attention | frozen peak, measured | plan's one-layer transient | plan / measured |")
    print("|---|---|---|---:|---:|---:|")
    for arch in ("qwen3", "llama"):
        s = _tiny_shape(arch)
        for prec in ("bf16", "fp32"):
            for attn in ("sdpa", "eager"):
                plan = activation_bytes(s, SEQ, SEQ, 1, 2 if prec == "bf16" else 4, checkpointing=False,
                                        eager=attn == "eager", trained=False) / SEQ
                measured = out[f"{arch} {prec} frozen {attn}"]
                print(f"| {arch} | {prec} | {attn} | {measured:,.0f} | {plan:,.0f} | {plan / measured:.2f} |")


if __name__ == "__main__":
    main()
