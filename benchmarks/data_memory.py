"""Peak resident memory of one training rank's data path vs corpus size (10k, 50k, 200k rows).

Builds tokenised Parquet of the demo world (10,000 demo rows tokenised with the demo
tokenizer, repeated under new sample ids to reach the larger sizes; written in parts of 8,192
rows with the tokenise phase's writer, ``stages.tokenize_io.write_part``), lets the driver
write the epoch list (``write_epoch_rows``), then runs, in a fresh process per (size, path),
rank 0 of 2 for ``--steps`` optimizer steps of the data path only (rows -> padded micro-batches;
no model), after importing what a worker imports (torch, DeepSpeed, transformers):

- ``streamed`` (this code): ``read_epoch_rows`` + ``RowReader`` + ``PhaseWorker``'s batching;
- ``whole`` (the code before it, replicated here): the epoch list as a pickled list of every
  sample id shipped to the worker, and every row the rank will ever need read into memory
  (``RowTable``: int32 slices of each 1,024-row batch, kept for the whole phase). The real old
  path read those batches through a Ray Dataset shard, whose object-store copies are not counted
  here, so these figures are a lower bound of what it cost.

Reported: the process's peak RSS (VmHWM) and its growth over the RSS after the imports.

Usage::

    python benchmarks/data_memory.py                  # 10k, 50k, 200k rows
    python benchmarks/data_memory.py --sizes 2000 5000 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 2**20
PART_ROWS = 8192


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def build(root: str, sizes: list[int]) -> dict[int, str]:
    import pyarrow as pa

    from benchmarks.packing import demo_rows
    from wmss_ray.models.tokenizer import build_demo_tokenizer
    from wmss_ray.stages.tokenize_io import write_part

    base = demo_rows(min(10_000, max(sizes)), build_demo_tokenizer(), 256)
    out = {}
    for n in sizes:
        d = os.path.join(root, f"tok_{n}")
        os.makedirs(d)
        for start in range(0, n, PART_ROWS):
            rows = [{**base[i % len(base)], "sample_id": f"r{i:07d}"} for i in range(start, min(n, start + PART_ROWS))]
            write_part(pa.Table.from_pylist(rows), os.path.join(d, f"part-{start // PART_ROWS:06d}.parquet"))
        out[n] = d
    return out


def _plan(n: int, args):
    from wmss_ray.training.dataset import DataPlan

    return DataPlan(n, 1.0, 0, args.micro_batch, 1, 2)


def child_streamed(tok_dir: str, epoch_rows_path: str, n: int, args) -> None:
    from wmss_ray.data.chat_tokens import collate
    from wmss_ray.training.dataset import RowReader, read_epoch_rows

    plan = _plan(n, args)
    epoch_rows = read_epoch_rows(epoch_rows_path)
    reader = RowReader(tok_dir)
    for step in range(args.steps):
        rows = reader.rows(epoch_rows[plan.rank_step(step, 0)])
        collate(rows, 0)


def child_whole(tok_dir: str, ids_pickle: str, n: int, args) -> None:
    import numpy as np
    import pyarrow.dataset as pads

    from wmss_ray.data.chat_tokens import collate

    with open(ids_pickle, "rb") as f:
        sample_ids = pickle.load(f)  # what the driver shipped in PhaseSpec.sample_ids
    plan = _plan(n, args)
    needed = {sample_ids[i] for i in np.unique(np.concatenate(
        [plan.micro_batch(s, 0, 0) for s in range(plan.total_steps)]))}
    index, toks, labs = {}, [], []  # the old RowTable.add_arrow, batch by batch
    for batch in pads.dataset(tok_dir, format="parquet").to_batches(batch_size=1024,
                                                                     columns=["sample_id", "input_ids", "labels"]):
        ids = [str(x) for x in batch.column(0).to_pylist()]
        tok, lab = batch.column(1), batch.column(2)
        offs = tok.offsets.to_numpy()
        t = tok.values.to_numpy(zero_copy_only=False).astype(np.int32)
        la = lab.values.to_numpy(zero_copy_only=False).astype(np.int32)
        for i, sid in enumerate(ids):
            if sid in needed and sid not in index:
                index[sid] = len(toks)
                toks.append(t[offs[i]:offs[i + 1]])
                labs.append(la[offs[i]:offs[i + 1]])
    for step in range(args.steps):
        rows = [{"input_ids": toks[index[sample_ids[i]]], "labels": labs[index[sample_ids[i]]]}
                for i in plan.micro_batch(step, 0, 0)]
        collate(rows, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)  # path, tok_dir, aux file, n
    args = p.parse_args()
    if args._child:
        import deepspeed  # noqa: F401  what a training worker has imported
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import wmss_ray.training.worker  # noqa: F401

        base = _status("VmRSS:")
        path, tok_dir, aux, n = args._child
        (child_streamed if path == "streamed" else child_whole)(tok_dir, aux, int(n), args)
        print("RESULT " + json.dumps({"peak_mb": _status("VmHWM:") / MB, "growth_mb": (_status("VmHWM:") - base) / MB}))
        return

    from wmss_ray.training.dataset import epoch_sample_ids, write_epoch_rows

    root = tempfile.mkdtemp(prefix="wmss-data-mem-")
    dirs = build(root, args.sizes)
    results = {}
    for n, d in dirs.items():
        epoch_rows = os.path.join(root, f"epoch_rows_{n}.parquet")
        write_epoch_rows(d, None, epoch_rows)
        ids_pickle = os.path.join(root, f"ids_{n}.pkl")
        with open(ids_pickle, "wb") as f:
            pickle.dump(epoch_sample_ids(d), f)
        size_mb = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d)) / MB
        for path, aux in (("streamed", epoch_rows), ("whole", ids_pickle)):
            cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps),
                   "--micro-batch", str(args.micro_batch), "--_child", path, d, aux, str(n)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
                raise SystemExit(f"{path} at {n} rows failed ({proc.returncode})")
            results[(n, path)] = {**json.loads(line[7:]), "parquet_mb": size_mb}
            print(n, path, results[(n, path)], flush=True)
    print(f"\nrank 0 of 2, micro-batch {args.micro_batch}, {args.steps} steps of the data path\n")
    print("| rows | parquet MB | streamed peak RSS MB | growth MB | whole-corpus (old) peak RSS MB | growth MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in dirs:
        s, w = results[(n, "streamed")], results[(n, "whole")]
        print(f"| {n:,} | {s['parquet_mb']:.0f} | {s['peak_mb']:.0f} | {s['growth_mb']:.0f} | {w['peak_mb']:.0f} | "
              f"{w['growth_mb']:.0f} |")
    first, last = results[(args.sizes[0], "streamed")], results[(args.sizes[-1], "streamed")]
    print(f"\nstreamed peak RSS, largest / smallest corpus: {last['peak_mb'] / first['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
