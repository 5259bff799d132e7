"""Training checkpoints (DeepSpeed state + data position + RNG) and the strong model export.

A checkpoint directory, as each rank writes it locally before ``ray.train.report`` merges the
ranks' directories into one in the run's storage::

    ds/                      DeepSpeed: module, optimizer, lr scheduler (per-rank ZeRO shards;
                             file names carry the rank, so the merge never collides)
    latest                   DeepSpeed's tag pointer (rank 0)
    trainer_state.json       rank 0: step, samples seen, the token counters (``metrics.COUNTERS``),
                             plan fingerprint (what the run computes),
                             layout (how it was executed: world size, ZeRO stage, batch split,
                             placement), the run's fingerprint and the step ranges each of its
                             processes trained (``segments``)
    rng_rank<r>.pt           each rank's torch / python RNG state

A checkpoint belongs to one run: ``fingerprint`` is the phase's (the pipeline's phase
fingerprint, or one derived from a direct ``train_phase`` call's inputs). It resumes only a run
of the same fingerprint (:func:`check_same_run`), and a finished run proves from its last
checkpoint that its steps ``[0, end)`` were all trained by runs of that fingerprint
(:func:`check_trained_all_steps`).

The frozen weak model is left out (``exclude_frozen_parameters``): it never changes, so a resumed
run rebuilds it from its init directory. A checkpoint written at another world size or ZeRO stage
is converted to a DeepSpeed universal checkpoint first (``resize``); ``trainer_state.json``
records the ``layout`` it was written at (world size, ZeRO stage, micro-batch, grad-accum,
placement).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from wmss_ray.training.resize import LayoutChangeError, checkpoint_layout, load_universal, needs_universal, to_universal

DS_TAG = "ds"
TRAINER_STATE = "trainer_state.json"
_RANK0_ONLY = ("zero_to_fp32.py", "zero_to_torch.py", "latest")


def staging_dir(path: str | None) -> str:
    """The local directory checkpoints and exports are staged in (``training.staging_dir``; None:
    the system temp dir), created when missing: the key names a directory on every node."""
    if path is None:
        return tempfile.gettempdir()
    os.makedirs(path, exist_ok=True)
    return path


def checkpoint_bytes(params: int, *, half: bool, stage: int, world: int, rank: int = 0) -> float:
    """Bytes rank ``rank`` writes into its staging directory for one *trained* model of
    ``params`` parameters (a frozen weak model is excluded from checkpoints; RNG and trainer
    state are kilobytes). Read from DeepSpeed's ``save_checkpoint`` (0.19):

    - ZeRO 1-3: every rank writes its optimizer partition, ``12 P / world`` (fp32 master copy,
      Adam ``exp_avg`` and ``exp_avg_sq``); at ZeRO 1-2 rank 0 also writes the whole module in
      the model dtype (``2 P`` bf16/fp16, ``4 P`` fp32); at ZeRO-3 the module file holds only
      placeholders of the partitioned parameters;
    - ZeRO 0 (fp32 only): rank 0 writes the module and Adam's moments, ``4 P + 8 P``.
    """
    if stage == 0:
        return 12.0 * params if rank == 0 else 0.0
    module = (2 if half else 4) * params if (stage < 3 and rank == 0) else 0
    return 12.0 * params / world + module


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_dir: str, rank: int, trainer_state: dict[str, Any], exclude_frozen: bool) -> str:
    """Write this rank's part of a checkpoint into the local directory ``ckpt_dir`` (collective)."""
    Path(ckpt_dir, DS_TAG).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={"wmss_step": trainer_state["step"]},
                           exclude_frozen_parameters=exclude_frozen)
    torch.save(_rng_state(), os.path.join(ckpt_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(ckpt_dir, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f, indent=1)
    else:  # files every rank may write with the same name: only rank 0's copy is uploaded
        for name in _RANK0_ONLY:
            for path in (Path(ckpt_dir, name), Path(ckpt_dir, DS_TAG, name)):
                path.unlink(missing_ok=True)
    return ckpt_dir


def read_trainer_state(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, TRAINER_STATE)) as f:
        return json.load(f)


def plan_value(plan: dict[str, Any], key: str) -> Any:
    """A checkpoint's recorded plan field; ``global_batch`` of an older checkpoint (which recorded
    the split, not the product) is ``micro_batch_size * grad_accum * world_size``."""
    if key == "global_batch" and key not in plan and "world_size" in plan:
        return plan["micro_batch_size"] * plan["grad_accum"] * plan["world_size"]
    return plan.get(key)


def check_plan(state: dict[str, Any], where: str, expect: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first ``expect`` field the checkpoint's plan differs in."""
    for key, value in expect.items():
        theirs = plan_value(state.get("plan", {}), key)
        if theirs != value:
            raise ValueError(f"{where} was written with {key}={theirs!r}, this run has {key}={value!r}; resume "
                             f"needs the same global batch, data plan and seed (the world size, micro-batch/"
                             f"grad-accum split and ZeRO stage may change)")


def check_resumable(state: dict[str, Any], where: str, expect: dict[str, Any], worlds: range, stage: int) -> None:
    """Driver side, before any worker starts: the checkpoint ``state`` resumes at every world size
    in ``worlds`` and ZeRO ``stage`` (:func:`check_plan`, ``resize.needs_universal``), so that a
    setting that cannot be honoured fails at once, not in every restarted worker group.

    Raises:
        ValueError, LayoutChangeError: naming ``where`` and what differs.
    """
    check_plan(state, where, expect)
    layout = checkpoint_layout(state)
    for world in worlds:
        needs_universal(layout, world, stage, where)


def load_checkpoint(engine, ckpt_dir: str, rank: int, exclude_frozen: bool,
                    expect: dict[str, Any] | None = None, fingerprint: str | None = None,
                    layout: dict[str, Any] | None = None, staging: str | None = None) -> dict[str, Any]:
    """Restore model(s), optimizer, scheduler and RNG from ``ckpt_dir``; return the trainer state.

    ``expect``: plan fields of what the run computes that must match the checkpoint's (global
    batch, seed, data size, steps, mode); a mismatch raises ``ValueError`` naming the field instead
    of silently resuming a different run. ``fingerprint``: the run's; a checkpoint of another run
    raises :class:`ForeignCheckpointError` (after the plan fields, which name what differs).
    ``layout``: how this run executes (``resize.LAYOUT_KEYS``); when its world size or ZeRO stage
    differs from the checkpoint's, the checkpoint is first converted to a universal one in
    ``staging`` (``resize``; collective). None: the checkpoint's own layout is assumed.
    """
    state = read_trainer_state(ckpt_dir)
    check_plan(state, f"checkpoint {ckpt_dir}", expect or {})
    if fingerprint is not None:
        check_same_run(state, f"checkpoint {ckpt_dir}", fingerprint)
    # Frozen weak weights are not in the checkpoint (the fresh ones are kept); everything else,
    # the strong model above all, must match key for key.
    custom = load_module_except_frozen if exclude_frozen else None
    saved = checkpoint_layout(state)
    if layout is not None and needs_universal(saved, layout["world_size"], layout["zero_stage"],
                                              f"checkpoint {ckpt_dir}"):
        _load_converted(engine, ckpt_dir, state, custom, staging_dir(staging))
    else:
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=True, custom_load_fn=custom)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
    rng_path = os.path.join(ckpt_dir, f"rng_rank{rank}.pt")
    # another world size: rank r's RNG stream is not the old rank r's (nothing in a step draws from it)
    if os.path.exists(rng_path) and (layout is None or saved.get("world_size") == layout["world_size"]):
        _set_rng_state(torch.load(rng_path, weights_only=True))  # tensors, ints and tuples only
    return state


def _load_converted(engine, ckpt_dir: str, state: dict[str, Any], custom_load_fn, staging: str) -> None:
    """Convert ``ckpt_dir`` to a universal checkpoint (the first rank of each node, into the node's
    ``staging`` directory), load it on every rank, delete it (collective: two barriers)."""
    import socket

    import torch.distributed as dist

    # one name per node, run and step: a staging_dir shared by nodes never mixes two conversions
    uc_dir = os.path.join(staging, f"wmss-universal-{socket.gethostname()}-{str(state.get('fingerprint'))[:16]}"
                                   f"-{state.get('step')}")
    first_on_node = int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0)) == 0
    error: BaseException | None = None
    try:
        if first_on_node:
            try:
                to_universal(ckpt_dir, DS_TAG, uc_dir)
            except BaseException as err:  # raised after the barrier: the other ranks must not hang in it
                error = err
        _barrier_all()
        if _any_rank(error is not None):
            raise error if error is not None else LayoutChangeError(
                f"converting {ckpt_dir} to a universal checkpoint failed on another rank")
        load_universal(engine, uc_dir, DS_TAG, custom_load_fn)
    finally:  # every rank gets here once (a failed conversion or load included): nothing is left behind
        _barrier_all()
        if first_on_node:
            shutil.rmtree(uc_dir, ignore_errors=True)


def _barrier_all() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)  # nccl reduces device tensors only
    dist.all_reduce(t)
    return bool(t.item())


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's module state does not fit the model (keys missing or unexpected)."""


class ForeignCheckpointError(RuntimeError):
    """A checkpoint written by a run of other inputs (another fingerprint) was about to be resumed."""


class UntrainedStepsError(RuntimeError):
    """A training run ended without having trained every step of its plan under its fingerprint."""


def check_same_run(state: dict[str, Any], where: str, fingerprint: str) -> None:
    """Raise :class:`ForeignCheckpointError` unless the checkpoint's ``state`` is of run ``fingerprint``."""
    theirs = state.get("fingerprint")
    if theirs != fingerprint:
        written = f"a run with other inputs (fingerprint {theirs})" if theirs else "an older wmss-ray (no fingerprint)"
        raise ForeignCheckpointError(
            f"{where} was written by {written}; this run is {fingerprint} and resumes only its own checkpoints. "
            f"Rerun the phase through the pipeline (it clears another run's checkpoints) or delete them")


def check_trained_all_steps(state: dict[str, Any], where: str, fingerprint: str, end: int) -> None:
    """The last checkpoint of a finished run: every step in ``[0, end)`` trained, once, by runs of
    ``fingerprint`` (``segments`` are contiguous from 0 to ``end``).

    Raises:
        ForeignCheckpointError, UntrainedStepsError: naming the checkpoint and what it shows.
    """
    check_same_run(state, where, fingerprint)
    segments = state.get("segments") or []
    pos = 0
    for start, stop in segments:
        if start != pos or stop < start:
            break
        pos = stop
    if pos != end or int(state.get("step", -1)) != end:
        raise UntrainedStepsError(f"{where}: the plan has {end} steps, but the runs of this phase trained "
                                  f"{segments} (step {state.get('step')}); refusing to report a model it did not train")


def load_module_except_frozen(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Load ``src`` into ``dst`` strictly, except that frozen parameters may be absent.

    DeepSpeed's ``custom_load_fn`` for a checkpoint saved with ``exclude_frozen_parameters``
    (frozen mode: the weak model). Only parameters of ``dst`` with ``requires_grad=False`` (every
    name of a tied one) may be missing; a missing trainable key (the strong model) or an
    unexpected key raises instead of silently keeping fresh weights.

    Raises:
        CheckpointMismatchError: naming up to 5 offending keys of each kind.
    """
    frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(k for k in result.missing_keys if k not in frozen)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]} (only frozen weak parameters may be absent)")


def gather_state_dict(model: torch.nn.Module, zero3: bool, rank: int) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict of ``model`` on rank 0 (``None`` elsewhere); collective under ZeRO-3.

    ZeRO-3 parameters are gathered one module at a time (peak extra memory: one layer). A
    parameter shared by two modules (tied embeddings) is stored once, under its first name;
    ``save_pretrained`` knows the tied name.
    """
    if not zero3:
        if rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None, enabled=bool(params)):
            if rank == 0:
                for name, p in params:
                    out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
                for name, buf in module.named_buffers(recurse=False):
                    if buf is not None and name not in module._non_persistent_buffers_set:
                        out[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()
    return out if rank == 0 else None


def export_strong(strong: torch.nn.Module, tokenizer, out_dir: str, zero3: bool, rank: int) -> str | None:
    """Write the strong model as a plain HF directory (safetensors + tokenizer); collective.

    Returns ``out_dir`` on rank 0, ``None`` elsewhere.
    """
    from wmss_ray.models.loading import export_model

    state_dict = gather_state_dict(strong, zero3, rank)
    if rank != 0:
        return None
    return export_model(strong, tokenizer, out_dir, state_dict=state_dict if zero3 else None)
