"""Resume a checkpoint at another world size or ZeRO stage: DeepSpeed universal checkpoints.

A checkpoint's DeepSpeed part is per-rank ZeRO shards: the optimizer state (fp32 master copy,
Adam's two moments: ``12 P`` bytes for ``P`` trained parameters) cut into ``W`` flat partitions
whose cut points depend on ``W`` and on the ZeRO stage (stage 1-2 flatten a parameter group, stage
3 each parameter). Such a checkpoint loads only into the same ``(W, stage)``. DeepSpeed's
``ds_to_universal`` rewrites it as one file per parameter and state (``zero/<name>/fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt``: the whole, unpartitioned tensors), which any ``W`` and any
ZeRO stage 1-3 loads, each rank taking its own slice (``load_universal_checkpoint``).

What DeepSpeed 0.19 supports, and what this module does about the rest:

- ZeRO 1, 2 and 3, fp32 or bf16/fp16, either way: converted, then loaded universally
  (``training.autocast`` writes the shards fp32 training writes: tested from W=2 ZeRO-2 to W=1 ZeRO-3);
- ZeRO 0 (fp32 weights only: fp32 models or ``training.autocast``, ``build_ds_config``): rank 0
  writes the whole module and the whole torch
  optimizer state (nothing is partitioned), so a ZeRO-0 checkpoint loads at any world size as it
  is; but ``ds_to_universal`` finds no ZeRO shards in it and a ZeRO-0 engine cannot load a
  universal one, so ZeRO 0 to ZeRO >= 1 (or back) raises :class:`LayoutChangeError` at once,
  naming both stages: never a silent restart from step 0.

Where the conversion runs, and why: in the workers, before the first step, by the first rank on
each node (``LOCAL_RANK`` 0) into that node's staging directory (``training.staging_dir``),
then a barrier. The universal files must be on every node that loads them (each rank reads every
parameter's file and keeps its slice), and the checkpoint itself is already there: Ray Train
hands each worker the checkpoint directory (shared filesystem, or downloaded per node from object
storage). The driver cannot do it: with ``scaling.num_workers: [min, max]`` only the started
workers know the world size they resume at, and the driver may not see the run storage as a
filesystem. Cost: it reads the ``12 P`` optimizer shards, writes ``12 P`` of fragments, merges
them into ``12 P`` of universal files (the fragments are deleted at the end), so ``~24 P`` bytes
of scratch per node at the peak; serial, measured at 120-180 MB of optimizer state per second on
the 2-core test box (an 85M-parameter fp32 model: 1.0 GB in 5.7 s from ZeRO-2, 8.7 s from
ZeRO-3), so ~5-7 min at 4B (48 GB) and ~9-14 min at 8B (96 GB) on such a CPU, less on a node's
cores and NVMe (docs/TRAINING.md "Checkpoints, resume, failures").
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from types import SimpleNamespace
from typing import Any

#: The keys of a checkpoint's ``layout``: how its run was executed (trainer_state.json).
LAYOUT_KEYS = ("world_size", "zero_stage", "micro_batch_size", "grad_accum", "placement")


class LayoutChangeError(RuntimeError):
    """A checkpoint cannot be resumed at this run's layout (and the run must not restart from 0)."""


def checkpoint_layout(state: dict[str, Any]) -> dict[str, Any]:
    """The layout a checkpoint was written at: its ``layout``, or for a checkpoint of an older
    wmss-ray (no ``layout``) the world size and batch split its ``plan`` records (stage unknown)."""
    if "layout" in state:
        return dict(state["layout"])
    plan = state.get("plan", {})
    return {"world_size": plan.get("world_size"), "zero_stage": None,
            "micro_batch_size": plan.get("micro_batch_size"), "grad_accum": plan.get("grad_accum"),
            "placement": None}


def needs_universal(saved: dict[str, Any], world: int, stage: int, where: str) -> bool:
    """Whether a checkpoint written at layout ``saved`` must be converted to load at ``world``
    ranks and ZeRO ``stage``: only when its ZeRO partitions differ (world size or stage; the
    micro-batch / grad-accum split and the weak model's placement change no DeepSpeed state).

    Raises:
        LayoutChangeError: the change cannot be honoured (ZeRO 0 to >= 1 or back; an older
            checkpoint without a recorded stage at another world size), naming ``where``.
    """
    old_world, old_stage = saved.get("world_size"), saved.get("zero_stage")
    if old_stage is None:  # an older wmss-ray's checkpoint: the stage is not recorded
        if old_world == world:
            return False
        raise LayoutChangeError(f"{where} was written by an older wmss-ray that did not record its ZeRO stage; "
                                f"it resumes only at its world size {old_world} (this run has {world} workers)")
    if old_stage == stage and (old_world == world or stage == 0):
        return False  # the same partitions, or none at all (ZeRO 0: the whole state on rank 0)
    if 0 in (old_stage, stage):
        raise LayoutChangeError(
            f"{where} was written at training.zero_stage {old_stage} and this run has {stage}: DeepSpeed's "
            f"universal checkpoints convert between ZeRO stages 1-3 only (a ZeRO-0 engine keeps an unpartitioned "
            f"torch optimizer). Resume with training.zero_stage: {old_stage}, or start the phase again")
    return True


def to_universal(ckpt_dir: str, tag: str, out_dir: str) -> str:
    """Convert the DeepSpeed checkpoint ``<ckpt_dir>/<tag>`` into ``<out_dir>/<tag>`` (universal,
    plus ``<out_dir>/latest_universal``); returns ``out_dir``. Serial (one process): the ranks
    and Ray's threads are around, and the work is I/O bound anyway.

    Raises:
        LayoutChangeError: DeepSpeed could not convert it (its output in the message).
    """
    from deepspeed.checkpoint import ds_to_universal

    target = os.path.join(out_dir, tag)
    shutil.rmtree(target, ignore_errors=True)
    args = SimpleNamespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=target, num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=True)  # DeepSpeed writes the version record only for AutoTP
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as err:
        raise LayoutChangeError(f"converting {ckpt_dir} to a universal checkpoint failed: {err!r}\n"
                                f"{log.getvalue()[-2000:]}") from err
    _alias_model_states(target)
    _any_stage_optimizer_state(os.path.join(target, "zero"), _param_shapes(target))
    # the rank-0-only files DeepSpeed's loader looks for next to the tag directory
    for name in os.listdir(ckpt_dir):
        if not name.startswith(tag) and os.path.isfile(os.path.join(ckpt_dir, name)):
            shutil.copy2(os.path.join(ckpt_dir, name), out_dir)
    return out_dir


#: The model-states file DeepSpeed opens first: ZeRO 1-2 name it one way, ZeRO-3 (one per rank)
#: the other. A universal load reads only metadata from it (the scheduler, the step counters; the
#: weights come from ``zero/``), so the loading stage's name may point at the saving stage's file.
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _alias_model_states(tag_dir: str) -> None:
    """Make both names of the first model-states file exist in ``tag_dir`` (another ZeRO stage
    looks for the other one)."""
    have = [n for n in _MODEL_STATES if os.path.exists(os.path.join(tag_dir, n))]
    if not have:
        raise LayoutChangeError(f"{tag_dir}: no DeepSpeed model-states file ({' or '.join(_MODEL_STATES)})")
    for name in _MODEL_STATES:
        if name not in have:  # a hard link: at ZeRO 1-2 the file holds the whole module (2-4 P bytes)
            src, dst = os.path.join(tag_dir, have[0]), os.path.join(tag_dir, name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _param_shapes(tag_dir: str) -> dict[str, Any]:
    """``{parameter name: shape}`` of the trained parameters, from the first model-states file."""
    import torch
    from deepspeed.checkpoint.constants import PARAM_SHAPES

    sd = torch.load(os.path.join(tag_dir, _MODEL_STATES[0]), map_location="cpu", weights_only=False)
    shapes = sd.get(PARAM_SHAPES) or []
    out: dict[str, Any] = {}
    for group in shapes if isinstance(shapes, list) else [shapes]:
        out.update(group)
    return out


def _any_stage_optimizer_state(zero_dir: str, shapes: dict[str, Any]) -> None:
    """Make the universal checkpoint in ``zero_dir`` loadable at every ZeRO stage 1-3.

    DeepSpeed 0.19 writes ``optimizer_state.pt`` and the per-parameter files in the layout of the
    *saving* stage's loader: ZeRO 1-2 read the groups from ``param_groups`` and the Adam step from
    each parameter's ``step.pt`` (which a ZeRO-3 conversion never writes: Adam would restart its
    bias correction at step 0), ZeRO-3 reads both from the nested ``optimizer_state_dict`` (which a
    ZeRO 1-2 conversion does not have), and ZeRO 1-2 insist on a ``ds_version``; a ZeRO-3
    conversion saves each state as a bare flat tensor, ZeRO 1-2 read ``{"param": tensor}``. This
    writes both forms; the nested one without the saving rank's optimizer tensors (never read).
    """
    import deepspeed
    import torch
    from deepspeed.checkpoint.constants import DS_VERSION, FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM

    path = os.path.join(zero_dir, "optimizer_state.pt")
    sd = torch.load(path, map_location="cpu", weights_only=False)
    inner = sd.get(OPTIMIZER_STATE_DICT)
    params = [d for d, _, files in os.walk(zero_dir) if "exp_avg.pt" in files]
    if isinstance(inner, dict) and inner.get("state"):  # saved at ZeRO-3
        step, groups = inner["state"][0]["step"], inner["param_groups"]
    else:  # saved at ZeRO 1-2: every trained parameter has the same step.pt
        steps = [os.path.join(d, "step.pt") for d in params if os.path.exists(os.path.join(d, "step.pt"))]
        if not steps:
            raise LayoutChangeError(f"{zero_dir}: no Adam step in the universal checkpoint")
        step, groups = torch.load(steps[0], weights_only=False), sd["param_groups"]
    sd.pop(FP32_FLAT_GROUPS, None)
    sd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": groups}
    sd["param_groups"] = groups
    sd.setdefault(DS_VERSION, deepspeed.__version__)
    torch.save(sd, path)
    for d in params:
        if not os.path.exists(os.path.join(d, "step.pt")):
            torch.save(step, os.path.join(d, "step.pt"))
        shape = shapes.get(os.path.relpath(d, zero_dir))
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = os.path.join(d, f"{key}.pt")
            value = torch.load(f, map_location="cpu", weights_only=False)
            if torch.is_tensor(value):  # written by a ZeRO-3 conversion: flat
                torch.save({PARAM: value.view(shape) if shape is not None else value}, f)


def _repair_optimizer(engine, zero_dir: str) -> None:
    """Give each optimizer param group its own Adam step tensor and its own saved hyperparameters back (lr, weight decay,
    betas, ...): DeepSpeed's ZeRO-3 universal load copies group 0's to every group, which would
    put weight decay on the norm weights and biases and the strong model's lr on a joint weak
    model (``ds_config.param_groups``)."""
    import torch

    # DeepSpeed's ZeRO-3 universal load gives every sub-group the *same* step tensor, which torch's
    # Adam increments in place: with n groups the step (and the bias correction) would advance n
    # times per optimizer step. One tensor each.
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), map_location="cpu", weights_only=False)["param_groups"]
    groups = engine.optimizer.param_groups
    if len(saved) != len(groups):
        raise LayoutChangeError(f"{zero_dir}: the checkpoint has {len(saved)} optimizer param groups, this model {len(groups)}")
    for group, old in zip(groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})


def load_universal(engine, uc_dir: str, tag: str, custom_load_fn=None) -> None:
    """Load the universal checkpoint ``<uc_dir>/<tag>`` into ``engine`` (module, optimizer,
    scheduler), each rank its own slice.

    DeepSpeed reads ``checkpoint.load_universal`` from the engine's config at load time only, so
    it is switched on for this one call (an engine built with it on would refuse the ordinary
    checkpoints of every later resume at the same layout).
    """
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(uc_dir, tag=tag, load_module_strict=True, custom_load_fn=custom_load_fn)
    finally:
        cfg.load_universal_checkpoint = before
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint in {uc_dir}")
    _repair_optimizer(engine, os.path.join(uc_dir, tag, "zero"))
