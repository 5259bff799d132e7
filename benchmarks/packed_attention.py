"""Packed rows' attention on a GPU: which kernel keeps packing fast, with or without flash-attn?

Issue 26's step matrix (BENCHMARKS.md, "The GPU check on an H200") ran packed rows through
``attn_implementation: sdpa``: transformers then builds a block-diagonal causal mask and SDPA
leaves its flash path (cuDNN attention backward 127 ms of a 468 ms ZeRO-2 step; the padded run
is 25 % faster). This times one attention layer, forward + backward, on the same rows up to five
ways (the GPU check's ``attention`` part runs it at the check's shape):

- ``sdpa causal``: one causal sequence per row; wrong for packed rows, the speed of light;
- ``sdpa block mask``: what transformers does for packed rows under ``sdpa`` today;
- ``flash-attn varlen``: ``flash_attn_varlen_func`` with the packer's ``cu_seqlens``, what
  ``models.attn_implementation: flash_attention_2`` runs (where flash-attn is installed);
- ``torch varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own flash varlen kernel,
  no flash-attn build) over the flattened tokens with ``cu_seqlens``;
- ``flex document mask``: ``flex_attention`` with a document-causal block mask (compiled).

Each packed variant's output and input gradients are compared with ``sdpa block mask``'s.

    python benchmarks/packed_attention.py [--rows 4 --seq 2048 --heads 16 --kv-heads 8 --head-dim 128]
    python benchmarks/packed_attention.py --device cpu --rows 2 --seq 256   # a smoke run (no varlen/flex)
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F


def pack_lengths(rows: int, seq: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """Document lengths of ``rows`` rows of exactly ``seq`` tokens (the last document of a row is
    cut to fit), drawn uniformly in ``[lo, hi]``: the recipe's packing of 100s-4k-token rows."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        left, docs = seq, []
        while left > 0:
            n = min(left, rng.randint(lo, hi))
            docs.append(n)
            left -= n
        out.append(docs)
    return out


def block_causal_mask(lengths: list[list[int]], seq: int, device) -> torch.Tensor:
    """``[rows, 1, seq, seq]`` bool: token i sees token j iff same document and j <= i."""
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def cu_seqlens(lengths: list[list[int]], device) -> tuple[torch.Tensor, int]:
    flat = [n for r in lengths for n in r]
    cu = torch.tensor([0] + flat, device=device).cumsum(0).to(torch.int32)
    return cu, max(flat)


def time_fwd_bwd(fn, q, k, v, warmup: int, iters: int) -> tuple[float, torch.Tensor, tuple]:
    """Median seconds of ``fn(q, k, v)`` forward + backward; its output and input gradients."""
    times = []
    out = grads = None
    for i in range(warmup + iters):
        for t in (q, k, v):
            t.grad = None
        if q.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(q, k, v)
        out.float().square().mean().backward()
        if q.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    grads = tuple(t.grad.detach().clone() for t in (q, k, v))
    return statistics.median(times), out.detach(), grads


def measure(rows: int = 4, seq: int = 2048, heads: int = 16, kv_heads: int = 8, head_dim: int = 128,
            doc_min: int = 100, doc_max: int = 2048, device: str | torch.device | None = None,
            iters: int = 10) -> dict:
    """Time every available kernel on the same packed rows; the summary (``results``: one row per
    kernel, ``fwd_bwd_ms`` and its differences to ``sdpa block mask``; ``notes``: what is missing)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    lengths = pack_lengths(rows, seq, doc_min, doc_max, seed=0)
    q = torch.randn((rows, heads, seq, head_dim), device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn((rows, kv_heads, seq, head_dim), device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn((rows, kv_heads, seq, head_dim), device=dev, dtype=dtype, requires_grad=True)
    rep = heads // kv_heads
    mask = block_causal_mask(lengths, seq, dev)
    cu, max_len = cu_seqlens(lengths, dev)

    def expand(t):  # [B, Hkv, L, D] -> [B, Hq, L, D]
        return t.repeat_interleave(rep, dim=1)

    def flat(t):  # [B, H, L, D] -> [B*L, H, D] (the packed token layout of the varlen kernels)
        return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])

    def unflat(o):
        return o.reshape(rows, seq, heads, head_dim).transpose(1, 2)

    variants = {
        "sdpa causal": lambda q, k, v: F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True),
        "sdpa block mask": lambda q, k, v: F.scaled_dot_product_attention(q, expand(k), expand(v), attn_mask=mask),
    }
    notes = {}
    if dev.type == "cuda":
        try:
            from flash_attn import flash_attn_varlen_func

            # what models.attn_implementation flash_attention_2 runs on packed rows (GQA native)
            variants["flash-attn varlen"] = lambda q, k, v: unflat(flash_attn_varlen_func(
                flat(q), flat(k), flat(v), cu, cu, max_len, max_len, causal=True))
        except ImportError as e:
            notes["flash-attn varlen"] = f"unavailable: {e!r} (the GPU image compiles it)"
        try:
            from torch.nn.attention.varlen import varlen_attn

            params = inspect.signature(varlen_attn).parameters
            causal_kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
            variants["torch varlen"] = lambda q, k, v: unflat(varlen_attn(
                flat(q), flat(expand(k)), flat(expand(v)), cu, cu, max_len, max_len, **causal_kw))
        except Exception as e:  # noqa: BLE001 - report what this torch lacks
            notes["torch varlen"] = f"unavailable: {e!r}"
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(dev)

            def doc_causal(b, h, qi, ki):
                return (doc[b, qi] == doc[b, ki]) & (ki <= qi)

            t0 = time.perf_counter()
            block = create_block_mask(doc_causal, rows, None, seq, seq, device=dev)
            compiled = torch.compile(flex_attention)
            variants["flex document mask"] = lambda q, k, v: compiled(q, k, v, block_mask=block, enable_gqa=True)
            notes["flex document mask"] = f"block mask built in {time.perf_counter() - t0:.2f} s"
        except Exception as e:  # noqa: BLE001
            notes["flex document mask"] = f"unavailable: {e!r}"
    else:
        notes["varlen and flex kernels"] = "CUDA only: not run"
    results = []
    ref = None
    for name, fn in variants.items():
        try:
            t0 = time.perf_counter()
            s, out, grads = time_fwd_bwd(fn, q, k, v, warmup=3, iters=iters)
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            results.append({"variant": name, "error": repr(e)[:300]})
            continue
        row = {"variant": name, "fwd_bwd_ms": round(s * 1e3, 3), "first_calls_s": round(first, 2)}
        if name == "sdpa block mask":
            ref = (out, grads)
        elif ref is not None and name != "sdpa causal":
            row["max_out_diff"] = float((out.float() - ref[0].float()).abs().max())
            row["max_grad_diff"] = max(float((g.float() - r.float()).abs().max()) for g, r in zip(grads, ref[1]))
        results.append(row)
    docs = [n for r in lengths for n in r]
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "rows": rows, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "documents": len(docs), "mean_doc": round(sum(docs) / len(docs), 1), "results": results, "notes": notes}


def table(summary: dict) -> list[str]:
    """The summary as Markdown lines: each kernel's time and its speed-up over the block mask."""
    lines = [f"{summary['device']}, torch {summary['torch']}: {summary['rows']} rows x {summary['seq']} tokens, "
             f"{summary['documents']} documents (mean {summary['mean_doc']} tokens), heads {summary['heads']}/"
             f"{summary['kv_heads']} x {summary['head_dim']}, {summary['dtype']}, one layer's forward + backward", "",
             "| kernel | fwd+bwd ms | x sdpa block mask | max out diff | max grad diff |", "|---|---:|---:|---:|---:|"]
    results = summary["results"]
    base = next((r["fwd_bwd_ms"] for r in results if r["variant"] == "sdpa block mask" and "fwd_bwd_ms" in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | |")
            continue
        speed = f"{base / r['fwd_bwd_ms']:.2f}" if base else ""
        diffs = [f"{r[k]:.1e}" if k in r else "" for k in ("max_out_diff", "max_grad_diff")]
        lines.append(f"| {r['variant']} | {r['fwd_bwd_ms']:.2f} | {speed} | {diffs[0]} | {diffs[1]} |")
    lines += [f"- {k}: {v}" for k, v in summary["notes"].items()]
    lines.append("- `sdpa causal` ignores the document boundaries (wrong for packed rows): the speed of light")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--doc-min", type=int, default=100)
    ap.add_argument("--doc-max", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    summary = measure(a.rows, a.seq, a.heads, a.kv_heads, a.head_dim, a.doc_min, a.doc_max, a.device, a.iters)
    print("\n".join(table(summary)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
