"""``train_phase``: phase 1 (SFT) and phase 2B (WMSS) on Ray Train + DeepSpeed.

The driver validates the inputs (weak/strong compatibility first, so a mismatch fails before any
worker starts), computes the data plan, and runs a ``TorchTrainer`` whose workers run
``ray_worker.train_loop_per_worker``: the Ray edge around ``rank_loop.run_rank``, one rank's
plain loop over :class:`~.worker.PhaseWorker`.

Run storage: Ray Train's ``RunConfig(storage_path=<out_dir>, name="ray_train")``, so checkpoints
are ``<out_dir>/ray_train/checkpoint_<step>/``; re-running ``train_phase`` on the same
``out_dir`` resumes from the latest one (Ray Train V2 restores its checkpoint manager from the
storage), as does Ray Train itself after a worker failure (``FailureConfig.max_failures``). A
checkpoint resumes only the run that wrote it: ``train_phase(fingerprint=...)`` names the run
(the pipeline passes its phase fingerprint), every checkpoint records it, a checkpoint of another
fingerprint in ``out_dir`` stops the call before any worker starts, and at the end the last
checkpoint must show every step of the plan trained by runs of that fingerprint.
A node of the run drained for preemption, or SIGTERM to the driver, makes every rank checkpoint
at its next step boundary (``stopping.py``): Ray Train resumes a preempted run, a stopped one
resumes when called again.
With ``mix.placement: pool`` (frozen WMSS) the driver first starts the weak pool
(``weak_pool.group.WeakPool``; it fails at once when it cannot be placed), hands its replica
handles to the workers, which load no weak model, and shuts it down after ``fit``.

``out_dir`` must be reachable by every node (local disk on one machine, a shared filesystem on a
cluster): rank 0 writes ``metrics.jsonl``, ``tb/`` and the exported ``model/`` there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from wmss_ray.cluster import ensure_ray
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.files import read_metrics
from wmss_ray.io.manifest import fingerprint as _fingerprint
from wmss_ray.training.checkpointing import (
    TRAINER_STATE,
    UntrainedStepsError,
    check_resumable,
    check_same_run,
    check_trained_all_steps,
    staging_dir,
)
from wmss_ray.training.dataset import EPOCH_ROWS_FILE, DataPlan, write_epoch_rows
from wmss_ray.training.rank_loop import RUN_NAME
from wmss_ray.training.ray_worker import phase_config, train_loop_per_worker
from wmss_ray.training.stopping import StopRequested, clear_stop, driver_stop_on_sigterm
from wmss_ray.training.validation import ValidationPoints, read_peak
from wmss_ray.training.worker import PhaseSpec

#: Test hook: ``"<rank>:<step>"`` makes that rank SIGKILL itself once, after that optimizer step.
FAULT_ENV = "WMSS_TRAIN_FAULT_KILL"
#: Test hook: ``"<step>:<seconds>"`` makes every rank sleep that long after that optimizer step
#: (before the stop poll): a node-fault test drains or removes a node while the run is mid-phase.
PAUSE_ENV = "WMSS_TRAIN_FAULT_PAUSE"


@dataclass
class TrainResult:
    """What a training phase produced.

    ``model_dir`` is the exported strong model (None when the run was stopped early with
    ``stop_after``); ``final_metrics`` the last logged metrics line; ``peak`` the
    validation-selected peak's ``peak.json`` (``ValidationPoints(keep_peak=True)``; None without,
    and, when stopped early, the peak among the validation points so far).
    """

    model_dir: str | None
    metrics_path: str
    steps: int
    final_metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None
    total_steps: int = 0
    peak: dict[str, Any] | None = None


def _resolve_mode(cfg: WMSSConfig, phase: str, mode: str | None) -> str:
    if phase == "sft":
        return "sft"
    mode = mode or cfg.mix.mode
    if mode not in ("joint", "frozen"):
        raise ValueError(f"WMSS mode must be 'joint' or 'frozen', got {mode!r}")
    if cfg.mix.placement == "pool" and mode != "frozen":
        raise ValueError(f"mix.placement 'pool' serves a frozen weak model only; WMSS mode {mode!r} needs "
                         "mix.placement: colocated")
    return mode


def build_spec(cfg: WMSSConfig, phase: str, strong_init: str, weak_init: str | None, tokenized_path: str,
               sampled_ids_path: str | None, out_dir: str, mode: str | None = None, *,
               epochs: float | None = None, exact_steps: int | None = None,
               stop_after: int | None = None, export_at_stop: bool = False,
               validation: ValidationPoints | None = None, fingerprint: str | None = None) -> PhaseSpec:
    """Validate a phase's inputs and compute its data plan (driver side, no Ray).

    ``fingerprint``: the run the checkpoints belong to; None derives one from this call's inputs
    (the config but for how it is executed, the model and data paths, epochs and step counts)."""
    if phase not in ("sft", "wmss"):
        raise ValueError(f"phase must be 'sft' or 'wmss', got {phase!r}")
    mode = _resolve_mode(cfg, phase, mode)
    if phase == "wmss":
        if weak_init is None or sampled_ids_path is None:
            raise ValueError("phase 'wmss' needs weak_init and sampled_ids_path")
        from wmss_ray.models.loading import check_pair_compatible

        check_pair_compatible(weak_init, strong_init, cfg.models.trust_remote_code)
    out = storage.location(out_dir)  # absolute local path or URI: every rank must reach it
    if not storage.is_remote(out):
        storage.make_dir(out)
    epoch_rows_path = storage.join(out, EPOCH_ROWS_FILE)  # the workers read it; nothing O(corpus) is shipped
    n = write_epoch_rows(tokenized_path, sampled_ids_path if phase == "wmss" else None, epoch_rows_path)
    if phase == "wmss" and cfg.mix.weak_source == "shuffled":  # every row's partner, once, for the ranks
        from wmss_ray.training.shuffled_weak import PARTNERS_FILE, write_partners

        write_partners(tokenized_path, cfg.curriculum_seed, cfg.mix.shuffle_bucket_rows, storage.join(out, PARTNERS_FILE))
    tokenized_path = storage.location(tokenized_path)
    t = cfg.training
    if epochs is None:
        epochs = t.sft_epochs if phase == "sft" else t.wmss_epochs
    # WMSS visits the curriculum's draw in an order of the curriculum's seed (tune.seeds varies it)
    seed = cfg.curriculum_seed if phase == "wmss" else cfg.train_seed
    # at the most workers; the ranks that start re-split G for their world size (PhaseSpec.for_world)
    world = cfg.scaling.num_workers
    plan = DataPlan(n_per_epoch=n, epochs=float(epochs), seed=seed,
                    micro_batch_size=t.micro_batch_size, grad_accum=cfg.grad_accum_for(world),
                    world_size=world, max_steps=t.max_steps, exact_steps=exact_steps)
    if fingerprint is None:
        # the layout (world size, batch split, ZeRO stage, placement) left out: a resize resumes
        fingerprint = _fingerprint({"config": cfg.run_dict(), "phase": phase, "mode": mode,
                                    "inputs": [str(strong_init), str(weak_init), tokenized_path, str(sampled_ids_path)],
                                    "epochs": epochs, "exact_steps": exact_steps})
    fault: dict[str, int] = {}
    if os.environ.get(FAULT_ENV):
        rank, step = os.environ[FAULT_ENV].split(":")
        fault = {"rank": int(rank), "step": int(step)}
    if os.environ.get(PAUSE_ENV):
        step, seconds = os.environ[PAUSE_ENV].split(":")
        fault.update(pause_step=int(step), pause_s=float(seconds))
    lora = lora_sources(cfg, phase, str(strong_init), str(weak_init) if weak_init else None)
    return PhaseSpec(phase=phase, mode=mode, strong_init=str(strong_init), **lora,
                     weak_init=str(weak_init) if weak_init and phase == "wmss" else None,
                     out_dir=str(out), tokenized_path=tokenized_path, epoch_rows_path=epoch_rows_path, plan=plan,
                     fingerprint=fingerprint, stop_after=stop_after,
                     export_at_stop=export_at_stop, validation=validation, fault=fault)


def lora_sources(cfg: WMSSConfig, phase: str, strong_init: str, weak_init: str | None) -> dict[str, Any]:
    """``training.lora``: the :class:`PhaseSpec` fields that say which base and adapters to build.

    A model a LoRA phase exported names its base and adapter (``models.lora.read_origin``): the
    strong model continues that adapter on that base (else a fresh adapter on ``strong_init``).
    The weak model shares the strong model's base when it is that base or that base plus an
    adapter (colocated only: the weak pool serves its own copy); otherwise it is loaded as is.
    """
    if not cfg.training.lora.enabled:
        return {}
    from wmss_ray.models.lora import read_origin, same_dir

    strong_base, strong_adapter = read_origin(strong_init) or (strong_init, None)
    out = {"strong_base": strong_base, "strong_adapter": strong_adapter}
    if phase == "wmss" and weak_init is not None and cfg.mix.placement == "colocated":
        weak_base, weak_adapter = read_origin(weak_init) or (weak_init, None)
        if same_dir(weak_base, strong_base):
            out.update(weak_shared=True, weak_adapter=weak_adapter)
    return out


def check_lora_strong(cfg: WMSSConfig) -> None:
    """``training.lora`` with a user's ``models.strong``: its tokenizer must be the weak model's
    (``models.weak``, else ``models.base``), checked before any phase runs.

    Raises:
        LoraConfigError: naming both keys, both directories and what differs.
    """
    m = cfg.models
    weak_key = "models.weak" if m.weak else "models.base"
    weak = m.weak or (None if m.demo else m.base)
    if not (cfg.training.lora.enabled and m.strong and weak):
        return
    from wmss_ray.models.loading import IncompatibleModelsError, check_pair_compatible
    from wmss_ray.models.lora import LoraConfigError

    try:
        check_pair_compatible(weak, m.strong, m.trust_remote_code)
    except IncompatibleModelsError as err:
        raise LoraConfigError(f"training.lora is on and models.strong {storage.redact(m.strong)} gets an adapter, "
                              f"but its tokenizer differs from {weak_key} {storage.redact(weak)}: {err}") from None


def checkpoint_states(out_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """``(checkpoint dir, trainer state)`` of every Ray Train checkpoint under ``<out_dir>/ray_train``."""
    states = []
    for path in storage.list_files(storage.join(out_dir, RUN_NAME), TRAINER_STATE):
        where = path[: -len(TRAINER_STATE) - 1]
        states.append((storage.redact(where), json.loads(storage.read_text(path))))
    return states



# ----------------------------------------------------------------------------- driver


def _start_pool(cfg: WMSSConfig, spec: PhaseSpec):
    """The weak pool of a frozen WMSS phase (``mix.placement: pool``), up and answering; None for
    any other phase. It fails at once when it cannot be placed next to the Train workers."""
    if not (spec.mode == "frozen" and cfg.mix.placement == "pool"):
        return None
    from wmss_ray.weak_pool.group import POOL_FAULT_ENV, ServerArgs, WeakPool
    from wmss_ray.weak_pool.server import pool_dtype

    p, sc = cfg.mix.pool, cfg.scaling
    train_resources = {"CPU": sc.cpus_per_worker * sc.num_workers}  # what the TorchTrainer asks for
    if sc.use_gpu:
        train_resources["GPU"] = (sc.gpus_per_worker or 1.0) * sc.num_workers
    dtype = pool_dtype(cfg.models.dtype, p.gpus_per_actor)
    overrides = {k: v for k, v in cfg.training.ds_config_overrides.get("zero_optimization", {}).items()
                 if k.startswith("stage3_")}  # the tiny tests force real partitioning this way
    args = ServerArgs(model_dir=spec.weak_init, top_k=p.top_k, dtype=dtype,
                      trust_remote_code=cfg.models.trust_remote_code, chunk_mb=cfg.mix.loss_chunk_mb(p.gpus_per_actor > 0), use_gpu=p.gpus_per_actor > 0, ds_overrides=overrides,
                      attn_implementation=cfg.models.attn_implementation,
                      fault=os.environ.get(POOL_FAULT_ENV), fault_marker=os.path.join(spec.out_dir, ".pool_fault_injected"))
    return WeakPool(args, p.replicas, p.shards, p.cpus_per_actor, p.gpus_per_actor, reserved=train_resources,
                    timeout_s=p.placement_timeout_s)


def _trainer_class(torch_trainer: type) -> type:
    """``TorchTrainer`` without the Ray Dataset actor: Ray Train V2 starts a ``DatasetManager``
    actor for every run, datasets or not, and our ranks read their own rows (``dataset.RowReader``),
    never a Ray Dataset. One process fewer per run on the head node (~1.4 CPU-s of imports and its
    memory, measured side by side on 3+3 fits). A Ray that no longer has this hook or callback
    keeps its own behaviour (the subclass then changes nothing)."""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return torch_trainer
    if not hasattr(torch_trainer, "_create_default_callbacks"):
        return torch_trainer

    class RowReaderTrainer(torch_trainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return RowReaderTrainer


def train_phase(cfg: WMSSConfig, phase: str, strong_init: str, weak_init: str | None, tokenized_path: str,
                sampled_ids_path: str | None, out_dir: str, mode: str | None = None, *,
                epochs: float | None = None, exact_steps: int | None = None,
                stop_after: int | None = None, export_at_stop: bool = False,
                validation: ValidationPoints | None = None, callbacks: list | None = None,
                fingerprint: str | None = None) -> TrainResult:
    """Train one phase on Ray Train and export the strong model to ``<out_dir>/model``.

    Args:
        cfg: the run config (``training``, ``mix``, ``scaling``, ``models``, ``run.seed``).
        phase: "sft" (strong only, all tokenised rows, ``sft_epochs``) or "wmss" (weak + strong,
            the curriculum's sampled ids, ``wmss_epochs``).
        strong_init, weak_init: local HF model directories (``weak_init`` for WMSS only).
        tokenized_path: Parquet dataset of ``{sample_id, input_ids, labels}`` rows.
        sampled_ids_path: WMSS only: Parquet ``{sample_id}`` with repeats (draw order).
        out_dir: the phase directory (metrics.jsonl, tb/, ray_train/ checkpoints, model/).
        mode: WMSS "joint" | "frozen" (default ``cfg.mix.mode``).
        epochs: overrides the config's epochs for this phase.
        exact_steps: train exactly this many optimizer steps (the equal-compute control, sft_continued).
        stop_after: stop (with a checkpoint, without export) after this many steps; a later call
            with the same ``out_dir`` resumes.
        export_at_stop: with ``stop_after`` short of the end, also export the strong model to
            ``<out_dir>/interim_model`` (a tune trial's intermediate evaluation).
        validation: validate inside the run every ``validation.every`` steps (a tune trial's
            intermediate reports, ``training/validation.py``); each such step is checkpointed
            and its ``ray.train.report`` carries the validation metrics. ``validation.keep_peak``:
            also keep the validation-selected peak (``<out_dir>/peak.json``, ``peak_model/``;
            the final model competes), returned as ``TrainResult.peak``.
        callbacks: Ray Train ``UserCallback``s for the controller (a tune trial's report to Tune).
        fingerprint: the run this call continues or starts (the pipeline's phase fingerprint);
            None derives one from the inputs. Checkpoints in ``out_dir`` of another fingerprint
            are never resumed: the call fails before any worker starts.

    Returns:
        :class:`TrainResult`. Optimizer steps: ``ceil(n_samples * epochs / global_batch)`` capped
        by ``training.max_steps``, ``global_batch = micro_batch_size * grad_accum * num_workers``.

    Raises:
        IncompatibleModelsError: WMSS weak and strong tokenizers / vocabularies differ.
        ForeignCheckpointError: ``out_dir`` holds checkpoints of another run.
        UntrainedStepsError: the run ended without every planned step trained under ``fingerprint``.
        StopRequested: SIGTERM reached this process during ``fit``: the ranks saved a checkpoint
            at their next step boundary and stopped; calling again resumes from it.

    A node of the run drained for preemption makes the ranks save a checkpoint at once and Ray
    Train restart them from it (``training.max_preemption_failures``; ``training/stopping.py``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from wmss_ray.training.backend import RankGroupConfig

    spec = build_spec(cfg, phase, strong_init, weak_init, tokenized_path, sampled_ids_path, out_dir, mode,
                      epochs=epochs, exact_steps=exact_steps, stop_after=stop_after,
                      export_at_stop=export_at_stop, validation=validation, fingerprint=fingerprint)
    out = spec.out_dir  # build_spec made it (absolute local path, or URI)
    for where, state in checkpoint_states(out):  # before any worker: never resume another run's work
        check_same_run(state, where, spec.fingerprint)
        # nor at a batch or ZeRO stage it cannot resume at (the workers would fail at every restart)
        check_resumable(state, where, spec.plan_fingerprint(), cfg.scaling.worker_counts, cfg.training.zero_stage)
    clear_stop(out)  # a request that stopped an earlier call is answered: this call resumes
    ckpt_fs, ckpt_root = storage.resolve_fs(out)  # Ray Train checkpoints go to the same storage
    ensure_ray()
    pool = _start_pool(cfg, spec)  # mix.placement pool only; shut down after fit
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1.0
    trainer = _trainer_class(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=phase_config(cfg, spec, pool.handles if pool else None),
        # TorchConfig's steps without torch in the controller (training/backend.py)
        torch_config=RankGroupConfig(backend="nccl" if sc.use_gpu else "gloo"),
        # elastic: Ray Train starts with what is free (>= min) and resizes by restarting from a checkpoint
        scaling_config=ScalingConfig(num_workers=(sc.min_workers, sc.num_workers) if sc.elastic else sc.num_workers,
                                     use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=ckpt_root, storage_filesystem=ckpt_fs,
            failure_config=FailureConfig(max_failures=cfg.training.max_failures,
                                         max_preemption_failures=cfg.training.max_preemption_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.checkpoints_to_keep),
            callbacks=list(callbacks or []),
        ),
        # No Ray Dataset: each rank reads its own rows of the tokenised Parquet (dataset.RowReader).
    )
    try:
        with driver_stop_on_sigterm(out):  # SIGTERM: the ranks checkpoint and return
            result = trainer.fit()
    finally:
        if pool is not None:
            pool.shutdown()
    metrics_path = storage.join(out, "metrics.jsonl")
    records = read_metrics(metrics_path) if storage.exists(metrics_path) else []
    ckpt = result.checkpoint
    steps = spec.end_step
    states = checkpoint_states(out)
    if not states:
        raise UntrainedStepsError(f"{storage.redact(out)}: the run ended without a checkpoint of step {steps}")
    where, last = max(states, key=lambda ws: int(ws[1].get("step", -1)))
    if clear_stop(out) and int(last.get("step", -1)) < steps:
        raise StopRequested(f"{storage.redact(out)}: stopped on request (SIGTERM) after step {last.get('step')} of "
                            f"{steps}, with a checkpoint: run the phase again to resume from it")
    check_trained_all_steps(last, where, spec.fingerprint, steps)  # a result it did not train is refused
    finished = steps == spec.plan.total_steps
    return TrainResult(
        model_dir=storage.join(out, "model") if finished else None,
        metrics_path=metrics_path,
        steps=steps,
        final_metrics=records[-1] if records else {},
        checkpoint_path=ckpt.path if ckpt is not None else None,
        total_steps=spec.plan.total_steps,
        peak=result_peak(spec),
    )


def result_peak(spec: PhaseSpec) -> dict[str, Any] | None:
    """The run's ``peak.json`` when it keeps the validation-selected peak, else None."""
    keeps = spec.validation is not None and spec.validation.keep_peak
    return read_peak(spec.out_dir) if keeps else None
