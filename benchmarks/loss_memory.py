"""Peak extra memory and time of the WMSS mixed-logit CE, forward + backward, on CPU.

Three implementations side by side, in joint mode (both sides trained) and frozen mode (weak
side without grad):

- ``naive``: materialise ``h_s @ W_s^T`` and ``h_w @ W_w^T`` (``[N, V]`` each), mix, then
  ``F.cross_entropy`` and backward (frozen: the weak logits are computed under ``no_grad``).
- ``ours``: ``wmss_ray.losses.mixing.chunked_mixed_ce`` (chunked fused linear CE, two heads), its
  chunk sized from ``--chunk-mb`` (the default, ``mix.chunk_mb``) unless ``--chunk N`` is given.
- ``ours@N`` (``--compare-chunks N,...``): the same at an explicit chunk of N tokens, side by side
  (e.g. 1024, the old default of ``mix.chunk_size``).
- ``fused``: PyTorch's ``F.linear_cross_entropy`` (chunked path) on the exact identity
  ``lam*z_s + (1-lam)*z_w = [lam*h_s, (1-lam)*h_w] @ [W_s, W_w]^T``; the concatenations run
  inside the timed step.

Memory: each (mode, implementation) runs in a fresh subprocess; peak extra = peak resident
memory during the steps minus resident memory once the inputs exist. The peak is the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), with a 2 ms sampling
thread over ``/proc/self/statm`` as a fallback. The "grad floor" is the size of the gradients
that every implementation must hand back (``[V, D]`` head gradients dominate); "working" is
peak extra minus that floor, i.e. what the loss needs beyond its outputs.

Time: median of ``--reps`` steps after one warm-up step, wall clock and process CPU time (the
latter is less sensitive to other processes on a shared machine). Correctness: loss and gradient
fingerprints (full ``grad_h``, 64 rows and a random projection of ``grad_W``) of all three are
compared against each other.

Usage::

    python benchmarks/loss_memory.py                      # defaults below, ~30 min on 2 cores
    python benchmarks/loss_memory.py --quick              # smoke test, a few seconds, in-process
    python benchmarks/loss_memory.py --out benchmarks/results_loss_memory.md
    python benchmarks/loss_memory.py --modes joint --impls naive,ours --compare-chunks 1024
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB, chunk_rows_for, chunked_mixed_ce  # noqa: E402

IMPLS = ("naive", "ours", "fused")
MODES = ("joint", "frozen")
IGN = -100
MB = 2**20


# ---------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


class PeakRSS:
    """Peak resident memory of this process between ``__enter__`` and ``__exit__``, in bytes."""

    def __enter__(self):
        gc.collect()
        self.baseline = _rss_bytes()
        try:  # "5" resets the high-water mark to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_ok = True
        except OSError:
            self.hwm_ok = False
        self.sampled, self._stop = self.baseline, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.sampled = max(self.sampled, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled, _hwm_bytes()) if self.hwm_ok else self.sampled
        self.peak_extra = peak - self.baseline


# ---------------------------------------------------------------- the three implementations
def make_inputs(a, mode: str):
    """Seeded fp32 inputs: hidden states [N, D], head weights [V, D], labels [N]."""
    g = torch.Generator().manual_seed(0)
    trained_weak = mode == "joint"
    hs = torch.randn(a.tokens, a.hidden, generator=g).requires_grad_()
    ws = (torch.randn(a.vocab, a.hidden, generator=g) * a.hidden**-0.5).requires_grad_()
    hw = torch.randn(a.tokens, a.hidden_weak, generator=g).requires_grad_(trained_weak)
    ww = (torch.randn(a.vocab, a.hidden_weak, generator=g) * a.hidden_weak**-0.5).requires_grad_(trained_weak)
    y = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    y[torch.rand(a.tokens, generator=g) < a.masked_frac] = IGN
    return (hs, ws, hw, ww), y


def step_naive(x, y, a):
    hs, ws, hw, ww = x
    zs = hs @ ws.T  # [N, V]
    with torch.set_grad_enabled(hw.requires_grad or ww.requires_grad):
        zw = hw @ ww.T  # [N, V]
    loss = F.cross_entropy(a.lam * zs + (1 - a.lam) * zw, y, ignore_index=IGN)
    loss.backward()
    return loss


def step_ours(x, y, a, chunk=None):
    chunk = chunk if chunk is not None else (None if a.chunk == "auto" else int(a.chunk))
    loss = chunked_mixed_ce(*x, y, a.lam, chunk_size=chunk, chunk_mb=a.chunk_mb)
    loss.backward()
    return loss


def step_fused(x, y, a):
    hs, ws, hw, ww = x
    h = torch.cat([a.lam * hs, (1 - a.lam) * hw], dim=1)  # [N, D_s + D_w]
    w = torch.cat([ws, ww], dim=1)  # [V, D_s + D_w]
    # chunking_method=None: use batch_chunk_size as given ("auto" is slow on CPU).
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=a.fused_chunk, chunking_method=None)
    loss = F.linear_cross_entropy(h, w, y, ignore_index=IGN, options=opts)
    loss.backward()
    return loss


STEPS = {"naive": step_naive, "ours": step_ours, "fused": step_fused}
SIZE_ARGS = ("tokens", "hidden", "hidden_weak", "vocab", "chunk", "chunk_mb", "fused_chunk", "reps", "lam",
             "masked_frac")


def step_for(impl: str):
    """The step function of ``impl``: one of :data:`STEPS` or ``ours@<chunk>``."""
    if impl.startswith("ours@"):
        chunk = int(impl.split("@", 1)[1])
        return lambda x, y, a: step_ours(x, y, a, chunk)
    return STEPS[impl]


def ours_rows(a) -> int:
    """Tokens per chunk of ``ours`` (resolved from the budget when ``--chunk auto``)."""
    n_valid = round(a.tokens * (1 - a.masked_frac))
    return chunk_rows_for(n_valid, a.vocab, a.chunk_mb) if a.chunk == "auto" else int(a.chunk)


def grad_floor_bytes(x) -> int:
    """Bytes of the gradients every implementation must return (the inputs that need grad)."""
    return sum(t.numel() * t.element_size() for t in x if t.requires_grad)


def fingerprint(x, loss) -> dict:
    """Loss, full grad_h, and 64 rows plus a random projection of each grad_W (cross-check).

    Not the column sums: sum_k (softmax - onehot)_k = 0, so grad_W sums to ~0 over the vocab.
    """
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(x[1].shape[0], generator=g)[:64]
    proj = torch.randn(x[1].shape[0], generator=g)  # [V]
    out = {"loss": loss.detach().clone()}
    for name, t in zip(("h_s", "W_s", "h_w", "W_w"), x):
        if t.grad is None:
            continue
        if name.startswith("h"):
            out[name] = t.grad.clone()
        else:
            out[name + "[rows]"], out[name + ".proj"] = t.grad[rows].clone(), proj @ t.grad
    return out


def run_one(a, impl: str, mode: str) -> tuple[dict, dict]:
    """Warm-up + reps steps of one implementation; returns (figures, fingerprint)."""
    x, y = make_inputs(a, mode)
    step, times, cpu_times, fp = step_for(impl), [], [], None
    with PeakRSS() as mem:
        for i in range(1 + a.reps):
            for t in x:
                t.grad = None  # free the previous step's gradients before the next one
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(x, y, a)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if fp is None:
                fp = fingerprint(x, loss)
            del loss
    result = {
        "impl": impl,
        "mode": mode,
        "peak_extra_mb": mem.peak_extra / MB,
        "grad_floor_mb": grad_floor_bytes(x) / MB,
        "time_s": statistics.median(times[1:]),
        "cpu_s": statistics.median(cpu_times[1:]),
        "times_s": times,
    }
    return result, fp


# ---------------------------------------------------------------- driver
def run_isolated(a, impl: str, mode: str, tmp: str) -> tuple[dict, dict]:
    """Run one (impl, mode) in a fresh python so that earlier allocations cannot hide a peak."""
    fp_path = os.path.join(tmp, f"{impl}-{mode}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, mode, "--fingerprint", fp_path]
    for k in SIZE_ARGS:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]), torch.load(fp_path, weights_only=True)


def max_rel_err(fa: dict, fb: dict) -> float:
    """Largest |a - b| / max|b| over the common fingerprint entries."""
    common = [k for k in fb if k in fa]
    return max(((fa[k] - fb[k]).abs().max() / fb[k].abs().max().clamp(min=1e-30)).item() for k in common)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return (
        f"{os.cpu_count()} CPU cores ({model}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at start"
    )


def report(a, results: list[dict], errs: dict) -> str:
    lines = [
        f"N = {a.tokens} tokens ({a.masked_frac:.0%} masked), D_s = {a.hidden}, "
        f"D_w = {a.hidden_weak}, V = {a.vocab}, lam = {a.lam}, fp32, chunk = {ours_rows(a)} (ours"
        f"{f', from --chunk-mb {a.chunk_mb:g}: [chunk, V] fp32 buffer {4 * ours_rows(a) * a.vocab / MB:.0f} MB' if a.chunk == 'auto' else ''}"
        f") / {a.fused_chunk} (fused), time = median of {a.reps} after 1 warm-up",
        "",
        "| mode | impl | peak extra MB | grad floor MB | working MB | time s | CPU time s | all steps s |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    by = {(r["mode"], r["impl"]): r for r in results}
    for r in results:
        working = r["peak_extra_mb"] - r["grad_floor_mb"]
        steps = ", ".join(f"{t:.2f}" for t in r["times_s"])
        lines.append(
            f"| {r['mode']} | {r['impl']} | {r['peak_extra_mb']:.0f} | {r['grad_floor_mb']:.0f} | "
            f"{working:.0f} | {r['time_s']:.2f} | {r['cpu_s']:.2f} | {steps} |"
        )
    lines += ["", "| mode | figure | ours/naive | ours/fused |", "|---|---|---:|---:|"]
    figures = {  # label -> value of one result row
        "peak extra": lambda r: r["peak_extra_mb"],
        "working": lambda r: r["peak_extra_mb"] - r["grad_floor_mb"],
        "time": lambda r: r["time_s"],
        "CPU time": lambda r: r["cpu_s"],
    }
    verdicts, chunk_lines = [], []
    for mode in a.modes:
        for extra in [i for i in a.impls if i.startswith("ours@")]:
            if (mode, "naive") in by and (mode, "ours") in by:
                naive, ours, other = by[(mode, "naive")], by[(mode, "ours")], by[(mode, extra)]
                chunk_lines += [f"| {mode} | {extra} | {k} | {f(ours) / f(naive):.3f} | {f(other) / f(naive):.3f} | "
                                f"{f(ours) / f(other):.3f} |" for k, f in figures.items()]
        if not all((mode, i) in by for i in IMPLS):
            continue
        naive, ours, fused = (by[(mode, i)] for i in IMPLS)
        vs_naive = {k: f(ours) / f(naive) for k, f in figures.items()}
        vs_fused = {k: f(ours) / f(fused) for k, f in figures.items()}
        lines += [f"| {mode} | {k} | {vs_naive[k]:.3f} | {vs_fused[k]:.3f} |" for k in figures]
        checks = [
            ("peak extra <= 1/10 naive", vs_naive["peak extra"] <= 0.1, vs_naive["peak extra"]),
            ("working <= 1/10 naive", vs_naive["working"] <= 0.1, vs_naive["working"]),
            ("time <= naive", vs_naive["time"] <= 1.0, vs_naive["time"]),
            ("peak extra <= fused", vs_fused["peak extra"] <= 1.0, vs_fused["peak extra"]),
            ("time <= fused", vs_fused["time"] <= 1.0, vs_fused["time"]),
        ]
        verdicts += [f"- {mode}: {name}: {'met' if ok else 'MISSED'} ({v:.3f})" for name, ok, v in checks]
    if chunk_lines:
        lines += ["", f"Chunk comparison: ours = {ours_rows(a)} tokens per chunk against explicit chunks",
                  "", "| mode | other | figure | ours/naive | other/naive | ours/other |", "|---|---|---|---:|---:|---:|",
                  *chunk_lines]
    lines += ["", "Targets:", *verdicts, "", "Cross-check (max |a-b| / max|b|, loss and grad fingerprints):"]
    lines += [f"- {k}: {v:.2e}" for k, v in errs.items()]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--hidden-weak", type=int, default=None, help="default: --hidden")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", default="auto", help="tokens per chunk (ours); auto: from --chunk-mb")
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_MB, help="MiB budget of ours' [chunk, V] buffer")
    p.add_argument("--compare-chunks", default="", help="also run ours at these explicit chunks (ours@N)")
    p.add_argument("--fused-chunk", type=int, default=None, help="fused batch_chunk_size (default: --chunk)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--masked-frac", type=float, default=0.0, help="fraction of ignored (prompt) tokens")
    p.add_argument("--modes", default="joint,frozen")
    p.add_argument("--impls", default=",".join(IMPLS), help="subset for tuning; the report needs all three")
    p.add_argument("--quick", action="store_true", help="tiny sizes, in-process: a smoke test")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.hidden, a.vocab, a.chunk, a.chunk_mb, a.reps = 128, 32, 2048, "auto", 0.25, 1
        a.hidden_weak = a.fused_chunk = None
        a.compare_chunks = a.compare_chunks or "96"
    a.hidden_weak = a.hidden_weak or a.hidden
    a.fused_chunk = a.fused_chunk or ours_rows(a)
    a.modes = [m for m in a.modes.split(",") if m]
    extra = [f"ours@{int(c)}" for c in a.compare_chunks.split(",") if c]
    a.impls = [i for i in IMPLS if i in a.impls.split(",")] + extra
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        result, fp = run_one(a, *a.worker)
        torch.save(fp, a.fingerprint)
        print(json.dumps(result))
        return 0
    info = machine()
    print(info, flush=True)
    results, fps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            for impl in a.impls:
                r, fp = run_one(a, impl, mode) if a.quick else run_isolated(a, impl, mode, tmp)
                results.append(r)
                fps[(mode, impl)] = fp
                mb, t, cpu = r["peak_extra_mb"], r["time_s"], r["cpu_s"]
                figures = f"peak extra {mb:9.1f} MB  time {t:8.3f} s  cpu {cpu:8.3f} s"
                print(f"{mode:6s} {impl:9s} {figures}", flush=True)
    errs = {}
    for mode in a.modes:
        for other in [i for i in a.impls if i != "ours" and "ours" in a.impls]:
            errs[f"{mode}: ours vs {other}"] = max_rel_err(fps[(mode, "ours")], fps[(mode, other)])
    text = report(a, results, errs)
    print(text)
    if a.out:
        cmd = "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:])
        with open(a.out, "w") as f:
            f.write(f"# Mixed-logit CE: peak memory and time (CPU)\n\nCommand: `{cmd}`\n\n"
                f"Machine: {info}, {os.getloadavg()[0]:.1f} at end\n\n{text}\n")
    worst = max(errs.values(), default=0.0)
    if worst > 1e-3:
        print(f"CROSS-CHECK FAILED: implementations disagree (max rel err {worst:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
