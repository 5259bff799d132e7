"""Generation throughput: HF ``generate`` vs vLLM on the same model, prompts and settings, side by side.

Both engines get the same prompt token ids (chat-rendered, as evaluation renders them), greedy,
exactly ``--new-tokens`` new tokens per prompt (``min_new_tokens`` / ``min_tokens``, so both do the
same work whatever the model emits), in one process each (a fresh interpreter per run, vLLM's
engine in that process as ``models.vllm_engine`` runs it). Printed per model and engine:

- ``start_s``: engine start (HF: model load; vLLM: engine build with its model load and KV cache);
- ``steady``: completions/s and new tokens/s over the generation itself, start excluded;
- ``end_to_end``: completions/s including the start (what one evaluation of this size costs);
- ratios vLLM / HF for each, and the prompt count above which vLLM's end-to-end wins on this
  machine (``start_vllm - start_hf`` over the difference in per-prompt time): what
  ``evaluation.vllm.cpu_min_rows`` is set from.

The two engines run alternately, A B A B (``--repeats``), and the medians are reported: this
machine is shared and noisy.

Usage::

    python benchmarks/generation.py                 # demo + ~100M Qwen3 shape, 256 prompts x 128 tokens
    python benchmarks/generation.py --quick         # smoke: the demo model, 32 prompts x 16 tokens
    python benchmarks/generation.py --out benchmarks/results_generation.json
    python benchmarks/generation.py --device cuda   # on a GPU, bf16 (``gpu_check.py`` runs it too)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Model shapes built from config (no model hub here): the demo's and a ~100M-parameter Qwen3.
SHAPES = {
    "demo": dict(arch="llama", hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=512),
    "qwen3-100m": dict(arch="qwen3", hidden_size=768, intermediate_size=2048, num_layers=14, num_heads=12,
                       num_kv_heads=4, max_position_embeddings=512),
}


def build(shape: str, out_dir: str) -> tuple[str, int]:
    from wmss_ray.config.schema import DemoModelConfig
    from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    model = build_tiny_model(DemoModelConfig(**SHAPES[shape]), tok, seed=0)
    return save_pretrained_model(model, tok, out_dir), sum(p.numel() for p in model.parameters())


def prompts_for(model_dir: str, n: int) -> list[list[int]]:
    from wmss_ray.data.chat_tokens import prompt_ids
    from wmss_ray.models.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    return [prompt_ids(tok, [{"role": "user", "content": f"Problem {i}: what is {i} + {3 * i} times {i % 9}?"}])
            for i in range(n)]


def run_engine(engine: str, model_dir: str, n: int, new_tokens: int, batch: int, device: str = "cpu",
               gpu_memory_utilization: float = 0.85) -> dict:
    """One engine, in this process: start, then generate; returns the timings. The project's
    dtype rule for both engines: fp32 on CPU, bf16 on a GPU; HF's attention as the project resolves
    it for the device (flash-attention 2 when installed on a GPU, else sdpa)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    prompts = prompts_for(model_dir, n)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if engine == "hf":
        from wmss_ray.data.chat_tokens import left_pad_prompts
        from wmss_ray.models.loading import load_causal_lm, load_tokenizer

        dtype = "bfloat16" if device == "cuda" else "float32"
        model = load_causal_lm(model_dir, dtype=dtype, device=device).eval()
        tok = load_tokenizer(model_dir)
        sync()
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        done = 0
        with torch.no_grad():
            for s in range(0, n, batch):
                ids, mask = left_pad_prompts(prompts[s:s + batch], tok.pad_token_id)
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=tok.pad_token_id)
                done += (gen.shape[1] - ids.shape[1]) * gen.shape[0]
        sync()
    else:
        from vllm import SamplingParams

        from wmss_ray.models.vllm_engine import VLLMEngine, VLLMSettings

        settings = VLLMSettings(cpu_kv_cache_gib=1.0, gpu_memory_utilization=gpu_memory_utilization)
        eng = VLLMEngine(model_dir, settings, device=device)
        start = time.perf_counter() - t0
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, detokenize=False)
        t1 = time.perf_counter()
        outs = eng.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        done = sum(len(o.outputs[0].token_ids) for o in outs)
    gen_s = time.perf_counter() - t1
    return {"engine": engine, "device": device, "start_s": start, "generate_s": gen_s, "new_tokens": done,
            "prompts": n}


def child_run(engine: str, model_dir: str, prompts: int, new_tokens: int, batch: int, device: str = "cpu",
              gpu_memory_utilization: float = 0.85) -> dict:
    """:func:`run_engine` in a fresh interpreter (vLLM sets its process's threads and memory
    policy, and a GPU process may hold memory a new engine needs); returns its timings."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--child", engine, "--model-dir", model_dir, "--prompts", str(prompts),
           "--new-tokens", str(new_tokens), "--batch", str(batch), "--device", device,
           "--gpu-memory-utilization", str(gpu_memory_utilization)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{engine} on {model_dir} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][7:])


def summarise(shape: str, params: int, runs: list[dict]) -> dict:
    by = {e: [r for r in runs if r["engine"] == e] for e in ("hf", "vllm")}
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("start_s", "generate_s", "new_tokens")}
           for e, rs in by.items()}
    n = runs[0]["prompts"]
    out = {"shape": shape, "params": params, "prompts": n, "runs_per_engine": len(by["hf"])}
    for e, m in med.items():
        out[e] = {"start_s": round(m["start_s"], 2), "generate_s": round(m["generate_s"], 2),
                  "steady_completions_per_s": round(n / m["generate_s"], 2),
                  "steady_new_tokens_per_s": round(m["new_tokens"] / m["generate_s"], 1),
                  "end_to_end_completions_per_s": round(n / (m["start_s"] + m["generate_s"]), 2)}
    out["ratio_vllm_over_hf"] = {k: round(out["vllm"][k] / out["hf"][k], 2) for k in
                                 ("steady_completions_per_s", "steady_new_tokens_per_s", "end_to_end_completions_per_s")}
    per_hf, per_vllm = med["hf"]["generate_s"] / n, med["vllm"]["generate_s"] / n
    extra_start = med["vllm"]["start_s"] - med["hf"]["start_s"]
    out["vllm_wins_end_to_end_from_prompts"] = (round(extra_start / (per_hf - per_vllm)) if per_hf > per_vllm
                                                else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="demo,qwen3-100m")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="HF generate's batch (evaluation.batch_size)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM's share of the GPU")
    ap.add_argument("--child")
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_engine(args.child, args.model_dir, args.prompts, args.new_tokens,
                                                args.batch, args.device, args.gpu_memory_utilization)))
        return
    if args.quick:
        args.shapes, args.prompts, args.new_tokens, args.repeats = "demo", 32, 16, 1
    results = []
    with tempfile.TemporaryDirectory(prefix="wmss-gen-bench-") as tmp:
        for shape in args.shapes.split(","):
            model_dir, params = build(shape, f"{tmp}/{shape}")
            runs = []
            for _ in range(args.repeats):  # A B A B
                for engine in ("hf", "vllm"):
                    runs.append(child_run(engine, model_dir, args.prompts, args.new_tokens, args.batch, args.device,
                                          args.gpu_memory_utilization))
                    print(json.dumps({"shape": shape, **runs[-1], "load_1min": os.getloadavg()[0]}), flush=True)
            results.append(summarise(shape, params, runs))
            print(json.dumps(results[-1], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "cpus": os.cpu_count(), "results": results},
                                             indent=1))


if __name__ == "__main__":
    main()
