"""Peak host memory per rank when a ZeRO-3 run loads its model: zero.Init vs full copies.

Builds a random-init Llama of ``--hidden`` x ``--layers`` (default ~322M parameters, fp32,
untied), saves it as safetensors, then for each way of loading starts 2 ranks
(``torch.distributed`` gloo, 2 processes on this CPU) that do what a training rank does before
its first step: load the model, wrap it in the pair module, ``deepspeed.initialize`` with the
client AdamW (states are allocated at the first step, not here). Each rank reports its peak RSS
(VmHWM) after the load, after the engine is built and (``--step``) after one optimizer step,
which allocates the AdamW states:

- ``full copy, ZeRO-3`` (the code before this change): ``load_causal_lm`` whole on every rank,
  then DeepSpeed partitions it at ``initialize``;
- ``full copy, ZeRO-2``: same load, parameters stay replicated (stage 2 partitions optimizer
  states and gradients only);
- ``zero.Init, ZeRO-3`` (this code): ``load_causal_lm(zero3_config=...)`` builds the model
  partitioned and scatters the checkpoint module by module.

``--world-sizes 1,2,4`` repeats the chosen ways (``--ways``) at each W, to show how the per-rank
peak falls with W (at W = 1 DeepSpeed partitions nothing: the figures are the whole state).

Usage::

    python benchmarks/zero3_load.py                 # ~322M parameters
    python benchmarks/zero3_load.py --world-sizes 1,2,4 --ways zero_init --step   # per-rank peak vs W
    python benchmarks/zero3_load.py --layers 2 --hidden 256 --vocab 4096   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 2**20
WAYS = (("full copy, ZeRO-3", "full", 3), ("full copy, ZeRO-2", "full", 2), ("zero.Init, ZeRO-3", "zero_init", 3))
WAY_NAMES = {"full3": 0, "full2": 1, "zero_init": 2}


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmHWM")


def _one_step(engine, vocab: int) -> None:
    """One optimizer step on a ``[1, 32]`` batch (every rank the same rows): AdamW allocates its
    states here, so the peak after it is the training state's."""
    import torch

    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    loss, _ = engine(ids, torch.ones_like(ids), labels, num_tokens=float((labels[:, 1:] != -100).sum()))
    engine.backward(loss)
    engine.step()


def rank_main(rank: int, port: int, model_dir: str, how: str, stage: int, out: str, world: int = 2,
              step: bool = False, vocab: int = 0) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from wmss_ray.config.loading import config_from_dict
    from wmss_ray.models.loading import load_causal_lm
    from wmss_ray.training.ds_config import build_ds_config, init_engine, param_groups
    from wmss_ray.training.pair import PairLM

    import deepspeed  # noqa: F401  imported before the baseline, as a training worker has

    cfg = config_from_dict({"training": {"zero_stage": stage, "micro_batch_size": 1}})
    base = _hwm()
    ds = build_ds_config(cfg.training, world, torch.float32, False) if how == "zero_init" else None
    model = load_causal_lm(model_dir, dtype="float32", zero3_config=ds)
    after_load = _hwm()
    pair = PairLM(model, None, "sft", 1.0, zero3=stage == 3)
    groups = param_groups(pair.trainable_groups(1e-4, None), 0.0)
    engine = init_engine(pair, groups, cfg.training, world, 10, torch.float32, False)
    after_engine = _hwm()
    res = {"base_mb": base / MB, "load_mb": after_load / MB, "engine_mb": after_engine / MB}
    if step:
        _one_step(engine, vocab)
        res["step_mb"] = _hwm() / MB
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--checkpoint-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the checkpoint is saved in (training is fp32): bfloat16 makes the "
                        "full-copy path convert, i.e. materialise, a whole fp32 model per rank")
    p.add_argument("--world-sizes", default="2", help="comma-separated W (ranks = processes on this host)")
    p.add_argument("--ways", default="full3,full2,zero_init",
                   help="comma-separated subset of full3 (full copy, ZeRO-3), full2, zero_init (zero.Init, ZeRO-3)")
    p.add_argument("--step", action="store_true", help="also one optimizer step (AdamW states) after the build")
    args = p.parse_args()
    worlds = [int(w) for w in args.world_sizes.split(",")]
    ways = [WAYS[WAY_NAMES[w]] for w in args.ways.split(",")]
    import torch
    import torch.multiprocessing as mp
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tempfile.mkdtemp(prefix="wmss-zero3-load-")
    model_dir = os.path.join(root, "model")
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, tie_word_embeddings=False)
    model = LlamaForCausalLM(mcfg)
    n_params = sum(q.numel() for q in model.parameters())
    model.to(getattr(torch, args.checkpoint_dtype)).save_pretrained(model_dir)
    del model
    full_mb = n_params * 4 / MB
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.0f}M "
          f"parameters, {full_mb:.0f} MB in fp32 (checkpoint saved in {args.checkpoint_dtype}); "
          f"W = {', '.join(map(str, worlds))} ranks (gloo, CPU)\n", flush=True)
    rows = []
    for world in worlds:
        for label, how, stage in ways:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = os.path.join(root, f"res_{how}_{stage}_{world}")
            mp.spawn(rank_main, args=(port, model_dir, how, stage, out, world, args.step, args.vocab),
                     nprocs=world, join=True)
            res = [json.load(open(f"{out}.{r}")) for r in range(world)]
            rows.append((label, world, res))
            print(label, f"W={world}", res, flush=True)
    step_cols = " peak RSS after 1 step MB | growth MB | x model |" if args.step else ""
    print("\n| load | W | rank | peak RSS after load MB | growth over start MB | x model | peak RSS after "
          "deepspeed.initialize MB | growth MB | x model |" + step_cols)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.step else ""))
    for label, world, res in rows:
        for r, x in enumerate(res):
            cells = [x["load_mb"], x["engine_mb"]] + ([x["step_mb"]] if args.step else [])
            figures = " | ".join(f"{c:.0f} | {c - x['base_mb']:.0f} | {(c - x['base_mb']) / full_mb:.2f}" for c in cells)
            print(f"| {label} | {world} | {r} | {figures} |")


if __name__ == "__main__":
    main()
