"""Validation inside a training run: a tune trial's intermediate reports without restarting it.

Every ``every`` optimizer steps short of the end the ranks export the strong model to
``<out_dir>/interim_model`` (the collective export of the finished model), and each rank loads
it with the plain :class:`~wmss_ray.stages.evaluator.Evaluator` and generates for its share of the
evaluator's pre-cut batches (batch ``i`` on rank ``i mod W``: the batches, hence the padding and
the outputs, are those of the evaluation phase). Rank 0 gathers the outputs and runs the same
checking, sums and writers as :func:`wmss_ray.stages.evaluate.evaluate_models`
(``<out_root>/validation_step<k>/eval_results.json`` and ``eval_WMSS.jsonl``); the metrics go to
every rank and into that step's ``ray.train.report``.

The engine is ``evaluation.engine``'s choice for the split's size on the ranks' device (the same on
every rank): HF in the rank's process, or vLLM in a child process of its own on the rank's GPU
(``stages.evaluator.run_in_child``: a vLLM engine must not share the process of a training rank,
which holds a process group), with ``gpu_memory_utilization`` from what is free next to the
training state. Generation is greedy only: the validation metric is greedy accuracy.

Without this a tune trial trained in chunks, one Train run per report: each reloaded both models
and the optimizer states from a checkpoint (for two 4B models on 16 GPUs, minutes per report).
Memory: each rank holds the evaluator's model copy next to its training state while it
generates (2 bytes per parameter in bf16), then frees it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.files import read_jsonl, write_jsonl

#: The metrics a validation point adds to its step's report.
VALIDATION_KEYS = ("validation_accuracy", "validation_loss", "n_validation")


@dataclass(frozen=True)
class ValidationPoints:
    """When and on what a training run validates itself.

    ``every``: optimizer steps between validations (at each multiple short of the last step; the
    trial evaluates the finished model on the whole split itself). ``rows_path``: JSON lines of
    normalised eval rows (:func:`wmss_ray.stages.evaluate.load_eval_rows` output). ``out_root``: where
    ``validation_step<k>/`` goes.
    """

    every: int
    rows_path: str
    out_root: str

    def due(self, done: int, total: int) -> bool:
        return self.every > 0 and done % self.every == 0 and done < total

    def step_dir(self, step: int) -> str:
        return storage.join(self.out_root, f"validation_step{step}")


def validation_bytes(params: int, layers: int, kv_heads: int, head_dim: int, vocab: int, *, dtype_bytes: int,
                     batch: int, seq: int, new_tokens: int, logits_mb: float = 1024.0) -> dict[str, float]:
    """Device bytes a rank adds while it validates (what :func:`validate_on_ranks` allocates next
    to the training state), for a model of ``params`` parameters and the given shape.

    - ``weights``: the :class:`~wmss_ray.stages.evaluator.Evaluator`'s copy of the exported model,
      whole (not ZeRO-partitioned): ``dtype_bytes x params``;
    - ``kv_cache``: greedy generation of a batch of ``batch`` (``evaluation.batch_size``) prompts
      of up to ``seq`` tokens (``data.max_seq_len``) plus ``new_tokens``
      (``evaluation.max_new_tokens``): ``2 (K, V) x layers x kv_heads x head_dim x batch x
      (seq + new_tokens) x dtype_bytes``;
    - ``ce_logits``: the teacher-forced CE (``Evaluator.answer_nll``) of ``rows =
      losses.chunk_ops.rows_per_forward(batch, seq, V, logits_mb)`` rows at a time
      (``evaluation.logits_mb``): ``rows x seq x V x (dtype_bytes + 4
      + 4)``, the logits in the model dtype, their fp32 copy and ``cross_entropy``'s fp32
      log-softmax.

    Generation and the CE run one after the other, so the peak is ``weights`` plus the larger of
    the other two (with a forward's transient activations).
    """
    from wmss_ray.losses.chunk_ops import rows_per_forward

    rows = rows_per_forward(batch, seq, vocab, logits_mb)
    return {"weights": float(dtype_bytes * params),
            "kv_cache": float(2 * layers * kv_heads * head_dim * batch * (seq + new_tokens) * dtype_bytes),
            "ce_logits": float(rows * seq * vocab * (dtype_bytes + 4 + 4)), "ce_rows": float(rows)}


@contextlib.contextmanager
def node_copy(model_dir: str, key: str, cfg: WMSSConfig) -> Iterator[str]:
    """A local directory with the files of model directory ``model_dir`` for the block.

    Local: ``model_dir`` itself. On object storage: a copy in this node's staging directory
    (``training.staging_dir``) under a folder keyed by ``model_dir`` and ``key`` (the step), made
    once per node (the ranks of a node take turns on a file lock; the first one copies, the
    others find its complete copy) and removed when the block ends. Not the per-node model cache
    (``storage.local_model_dir``'s default): it keys a copy by the files' names, sizes and
    modification times, which two exports of an interim model in the same second repeat, so a
    cached copy of the previous step's model could be validated instead of this one.

    Callers end the block only after a collective that every rank reaches once it is done with
    the copy (``validate_on_ranks`` ends with a broadcast), so no rank deletes it under another.
    """
    import fcntl
    import hashlib
    import shutil

    from wmss_ray.training.checkpointing import staging_dir

    if not storage.is_remote(model_dir):
        yield model_dir
        return
    digest = hashlib.sha256(f"{storage.redact(model_dir)} {key}".encode()).hexdigest()[:16]
    root = os.path.join(staging_dir(cfg.training.staging_dir), f"wmss-interim-{digest}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            local = storage.local_model_dir(model_dir, cache_root=root)
        yield local
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_rows(rows: list[dict[str, Any]], path: str) -> None:
    """``rows`` (normalised eval rows) as the JSON lines of ``points.rows_path``."""
    write_jsonl(path, rows)


def validate_on_ranks(cfg: WMSSConfig, points: ValidationPoints, model_dir: str, step: int, rank: int, world: int,
                      device: Any) -> dict[str, Any]:
    """Collective (every rank calls it): the model at ``model_dir`` on ``points.rows_path``.

    Returns, on every rank, ``{validation_accuracy, validation_loss, n_validation, step}``; rank 0
    writes ``points.step_dir(step)``.
    """
    import tempfile

    import torch
    import torch.distributed as dist

    from wmss_ray.stages.evaluate import eval_chunks, evaluate_models, load_eval_rows
    from wmss_ray.stages.evaluator import Evaluator, evaluator_kwargs, resolve_engine, run_in_child

    rows = read_jsonl(points.rows_path)
    # The same choice on every rank (a function of the config and the row count).
    engine = resolve_engine(cfg, len(rows), on_gpu=torch.device(device).type == "cuda")

    def generate(path: str, chunks: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        mine = [i for i in range(len(chunks)) if i % world == rank]
        outputs: dict[int, list[dict[str, Any]]] = {}
        # Greedy only: the validation metric is greedy accuracy (no sampled completions here).
        kwargs = {**evaluator_kwargs(path, cfg, engine), "device": str(device), "sampling": None}
        if mine and engine == "vllm":  # in a process of its own, on this rank's device
            with tempfile.TemporaryDirectory(prefix="wmss-engine-") as work:  # local to this node
                outputs = dict(zip(mine, run_in_child(kwargs, [chunks[i] for i in mine], work, device)))
        elif mine:
            evaluator = Evaluator(**kwargs)
            outputs = {i: evaluator(chunks[i]) for i in mine}
            del evaluator
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the copy goes before training resumes
        gathered: list[dict[int, list[dict[str, Any]]] | None] = [None] * world
        dist.all_gather_object(gathered, outputs)
        merged = {i: out for part in gathered for i, out in (part or {}).items()}
        return [res for i in range(len(chunks)) for res in merged[i]]

    metrics: list[dict[str, Any] | None] = [None]
    if rank == 0:
        res = evaluate_models({"WMSS": model_dir}, rows, cfg, points.step_dir(step), eval_set="validation",
                              generate=generate, generate_engine=engine)["WMSS"]
        metrics[0] = {"validation_accuracy": float(res.accuracy), "validation_loss": float(res.loss),
                      "n_validation": int(res.n), "step": step}
    else:  # the same batches as rank 0's evaluate_models cuts
        generate(model_dir, eval_chunks(load_eval_rows(rows, cfg), cfg.evaluation.batch_size))
    dist.broadcast_object_list(metrics, src=0)
    return metrics[0]
