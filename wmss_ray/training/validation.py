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

**The validation-selected peak** (``ValidationPoints(keep_peak=True)``; the controls study reports
it for every arm): the peak is the model with the highest ``validation_accuracy`` among the
validation points *and the final model*, ties going to the earlier step (fewer updates). The final
model competes: once the finished run has exported ``<out_dir>/model`` the ranks validate it too
(``validation_step<total>/``). Whenever a point beats the best so far (:func:`better`), rank 0
copies ``<out_dir>/interim_model`` to ``<out_dir>/peak_model`` and writes ``<out_dir>/peak.json``
(:data:`PEAK_KEYS`); when the final model wins, ``peak.json`` names ``<out_dir>/model`` and
``peak_model/`` is removed. The best so far survives a restart: the ranks start from rank 0's
reading of ``peak.json`` (:func:`resume_peak`), and a step validated again after a restart ties with
itself, so it never moves the peak.

Without this a tune trial trained in chunks, one Train run per report: each reloaded both models
and the optimizer states from a checkpoint (for two 4B models on 16 GPUs, minutes per report).
Memory: each rank holds the evaluator's model copy next to its training state while it
generates (2 bytes per parameter in bf16), then frees it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.files import read_jsonl, write_jsonl

#: The metrics a validation point adds to its step's report.
VALIDATION_KEYS = ("validation_accuracy", "validation_loss", "n_validation")
#: ``<out_dir>/<PEAK_FILE>``: the validation-selected peak so far (``keep_peak``), :data:`PEAK_KEYS`.
PEAK_FILE = "peak.json"
#: ``<out_dir>/<PEAK_MODEL>``: the copy of the interim export that is the peak (none when the final model is).
PEAK_MODEL = "peak_model"
#: The selection rule, written into every ``peak.json`` (one rule for every arm of a study).
PEAK_RULE = ("highest validation_accuracy among the validation points and the final model; "
             "ties go to the earlier step")
PEAK_KEYS = ("step", "validation_accuracy", "validation_loss", "n_validation", "model_dir", "rule")


@dataclass(frozen=True)
class ValidationPoints:
    """When and on what a training run validates itself.

    ``every``: optimizer steps between validations (at each multiple short of the last step; the
    trial evaluates the finished model on the whole split itself). ``rows_path``: JSON lines of
    normalised eval rows (:func:`wmss_ray.stages.evaluate.load_eval_rows` output). ``out_root``: where
    ``validation_step<k>/`` goes. ``keep_peak``: keep the validation-selected peak (the module
    docstring's rule): ``<out_dir>/peak.json`` and ``<out_dir>/peak_model/``, and validate the final
    model too.
    """

    every: int
    rows_path: str
    out_root: str
    keep_peak: bool = False

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


# ----------------------------------------------------------------------------- the validation-selected peak


def better(candidate: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether the validated model ``candidate`` (``{"step", "validation_accuracy", ...}``) beats the
    peak so far ``best`` (None: none yet) under :data:`PEAK_RULE`: a higher accuracy, or the same
    accuracy at an earlier step. A step validated again (after a restart) ties with itself: no move."""
    if best is None:
        return True
    acc, top = float(candidate["validation_accuracy"]), float(best["validation_accuracy"])
    return acc > top or (acc == top and int(candidate["step"]) < int(best["step"]))


def peak_record(metrics: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """The ``peak.json`` of the model at ``model_dir`` validated with ``metrics`` (``validate_on_ranks``'s)."""
    return {"step": int(metrics["step"]), "validation_accuracy": float(metrics["validation_accuracy"]),
            "validation_loss": float(metrics["validation_loss"]), "n_validation": int(metrics["n_validation"]),
            "model_dir": model_dir, "rule": PEAK_RULE}


def read_peak(out_dir: str) -> dict[str, Any] | None:
    """``<out_dir>/peak.json`` (None when there is none).

    Raises:
        ValueError: naming the file and the missing field, or why it is not JSON.
    """
    path = storage.join(out_dir, PEAK_FILE)
    if not storage.exists(path):
        return None
    try:
        peak = json.loads(storage.read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{storage.redact(path)}: not JSON ({err}); delete it to select the peak again") from None
    missing = [k for k in PEAK_KEYS if not isinstance(peak, dict) or k not in peak]
    if missing:
        raise ValueError(f"{storage.redact(path)}: field {missing[0]!r} is missing "
                         f"(a peak.json has {', '.join(PEAK_KEYS)})")
    return peak


def replace_dir(src: str, dst: str) -> None:
    """Make directory ``dst`` a copy of directory ``src``.

    Local: copied to ``<dst>.tmp`` and swapped in by two renames, so ``dst`` is whole (the old copy
    or the new one) but for the instant between them. Object storage has no rename: ``dst`` is
    emptied and filled by server-side copies (``storage.copy_dir``); ``peak.json`` is written
    after, so it never names a copy in the making as complete.
    """
    import shutil

    if storage.is_remote(dst):
        storage.copy_dir(src, dst)
        return
    src, dst = storage.resolve_fs(src)[1], storage.resolve_fs(dst)[1]
    tmp, old = dst + ".tmp", dst + ".old"
    for leftover in (tmp, old):  # of a copy a crash interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(src, tmp)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (collective; returns on a rank only once rank 0 sent it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resume_peak(out_dir: str, start: int, rank: int) -> dict[str, Any] | None:
    """Collective, as a ``keep_peak`` run (re)starts at step ``start``: the peak so far on every rank.

    Rank 0 reads ``peak.json`` and sends it to the others, so every rank agrees. A run starting at
    step 0 has none: rank 0 removes what an earlier attempt left (it resumed no checkpoint, so its
    validations count for nothing)."""
    peak = None
    if rank == 0:
        if start == 0:
            storage.delete_file(storage.join(out_dir, PEAK_FILE))
            storage.delete_dir(storage.join(out_dir, PEAK_MODEL))
        else:
            peak = read_peak(out_dir)
    return _from_rank0(peak)


def keep_peak(metrics: dict[str, Any], best: dict[str, Any] | None, out_dir: str, validated: str, rank: int, *,
              final: bool) -> dict[str, Any] | None:
    """Collective, after each validation of a ``keep_peak`` run: the peak, updated (on every rank).

    ``metrics``: :func:`validate_on_ranks`' result for the model at ``validated`` (its storage
    location, not a node's copy). A validation point's model (``final`` False: the interim export)
    that beats ``best`` is copied by rank 0 to ``<out_dir>/peak_model``; the final model
    (``final``: ``<out_dir>/model``) is named as it is, and once it is the peak ``peak_model/`` is
    removed. Rank 0 then writes ``peak.json``; every rank returns only once rank 0 is done.
    """
    peak = best
    if rank == 0:
        if better(metrics, best):
            where = validated if final else storage.join(out_dir, PEAK_MODEL)
            if not final:
                replace_dir(validated, where)
            peak = peak_record(metrics, where)
            storage.write_text(storage.join(out_dir, PEAK_FILE), json.dumps(peak, indent=1))
        if final and peak is not None and peak["model_dir"] == validated:  # also when a restart finds it so
            storage.delete_dir(storage.join(out_dir, PEAK_MODEL))
    return _from_rank0(peak)
