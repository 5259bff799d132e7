"""The training step and loop of one rank: plain code, no Ray.

:class:`PhaseWorker` owns one DeepSpeed engine over a :class:`~wmss_ray.training.pair.PairLM`
and runs optimizer steps from a :class:`~wmss_ray.training.dataset.DataPlan`. It needs an
initialised ``torch.distributed`` process group (Ray Train's TorchTrainer makes one; tests
and the benchmark use :func:`init_single_process`). The Ray glue is in ``trainer.py``.

The loss scaling, in one place. DeepSpeed turns the per-micro-batch losses ``l_{r,a}`` of rank
``r`` and accumulation step ``a`` into the gradient ``(1 / W) * sum_r sum_a grad(l_{r,a}) / A``
(``engine.backward`` divides by ``A = grad_accum``, the all-reduce averages over ``W`` ranks).
WMSS wants the gradient of ``sum of token losses over the global batch / N`` where ``N`` is the
global answer-token count of the step. So each step first prefetches its ``A`` micro-batches,
all-reduces their token count to get ``N``, and every micro-batch returns
``l_{r,a} = (sum of its token losses) / N * W * A``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data.chat_tokens import collate
from wmss_ray.io import storage
from wmss_ray.training.dataset import (DataPlan, ReadAhead, RowReader, answer_tokens, input_tokens,
                                       read_epoch_rows)
from wmss_ray.losses.positions import answer_positions
from wmss_ray.losses.stats import LossStats
from wmss_ray.training.metrics import (COUNTERS, add_counters, all_reduce_stats, all_reduce_sum, is_log_step,
                                      pool_metrics, resumed_counters, step_metrics)
from wmss_ray.training.packing import pack_rows
from wmss_ray.training.pair import PairLM
from wmss_ray.training.shuffled_weak import PARTNERS_FILE, partner_batch, read_partners
from wmss_ray.training.validation import ValidationPoints


@dataclass
class PhaseSpec:
    """What one phase trains; identical on every rank (sent through ``train_loop_config``)."""

    phase: str  # "sft" | "wmss"
    mode: str  # "sft" | "joint" | "frozen"
    strong_init: str
    weak_init: str | None
    out_dir: str
    tokenized_path: str  # the tokenised Parquet every rank reads its own rows from
    epoch_rows_path: str  # the epoch list as global row numbers (dataset.write_epoch_rows)
    plan: DataPlan
    fingerprint: str = ""  # the run its checkpoints belong to (the pipeline's phase fingerprint)
    stop_after: int | None = None  # end (checkpointed, not exported) after this many steps
    export_at_stop: bool = False  # with stop_after: also export the strong model to <out_dir>/interim_model
    validation: ValidationPoints | None = None  # validate (and checkpoint) every k steps inside the run
    fault: dict[str, Any] = field(default_factory=dict)  # test hooks: {"rank", "step"} kill, {"pause_step", "pause_s"}
    # training.lora: the strong model is strong_base + the adapter in strong_adapter (None: a fresh
    # one; strong_base None: strong_init itself); weak_shared: the weak model is that same base
    # with weak_adapter (None: no adapter), no second copy (trainer.build_spec decides)
    strong_base: str | None = None
    strong_adapter: str | None = None
    weak_shared: bool = False
    weak_adapter: str | None = None

    @property
    def end_step(self) -> int:
        total = self.plan.total_steps
        return min(total, self.stop_after) if self.stop_after else total

    def plan_fingerprint(self) -> dict[str, Any]:
        """What the run computes, which a checkpoint it resumes must share: the global batch (not
        its split over ranks and micro-batches), the data order's seed and size, the steps, the mode."""
        p = self.plan
        return {"global_batch": p.global_batch, "seed": p.seed, "n_per_epoch": p.n_per_epoch,
                "total_steps": p.total_steps, "mode": self.mode}

    def for_world(self, world: int) -> "PhaseSpec":
        """This phase on the ``world`` ranks that started (elastic or resized runs): the same global
        batch, grad-accum following the world size (``DataPlan.for_world``)."""
        return self if world == self.plan.world_size else replace(self, plan=self.plan.for_world(world))


def init_single_process(backend: str = "gloo", port: int | None = None) -> None:
    """A world-size-1 process group for running :class:`PhaseWorker` without Ray."""
    if torch.distributed.is_initialized():
        return
    from wmss_ray.cluster import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port() if port is None else port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.distributed.init_process_group(backend=backend, rank=0, world_size=1)


class PhaseWorker:
    """One rank's models, engine and optimizer step.

    Args:
        cfg: the run config (``training``, ``mix``, ``models`` sections are used).
        spec: the phase (models, mode, data plan).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        device: ``torch.device`` of this rank (``cuda:<i>`` or ``cpu``).
    """

    def __init__(self, cfg: WMSSConfig, spec: PhaseSpec, rank: int, world_size: int, device: torch.device,
                 pool_handles: list | None = None):
        from wmss_ray.models.loading import (
            load_causal_lm,
            load_tokenizer,
            resolve_attn_implementation,
            resolve_dtype,
        )
        from wmss_ray.training.ds_config import build_ds_config, init_engine, param_groups

        if spec.plan.world_size != world_size:
            raise ValueError(f"data plan is for {spec.plan.world_size} ranks, this group has {world_size}")
        self.cfg, self.spec, self.rank, self.world_size = cfg, spec, rank, world_size
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.dtype = resolve_dtype(cfg.models.dtype, self.device)
        self.zero3 = cfg.training.zero_stage == 3
        # grad-accum is the plan's (G / (micro-batch x world)), which a resized run changes
        training = cfg.training.model_copy(update={"grad_accum": spec.plan.grad_accum})
        #: how this run is executed; each checkpoint records it (a resume elsewhere converts)
        self.layout = {"world_size": world_size, "zero_stage": cfg.training.zero_stage,
                       "micro_batch_size": spec.plan.micro_batch_size, "grad_accum": spec.plan.grad_accum,
                       "placement": cfg.mix.placement}
        self.tokenizer = load_tokenizer(spec.strong_init, cfg.models.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # ZeRO-3: built under zero.Init, weights scattered into the partitions (no full copy per rank).
        zero3_config = build_ds_config(training, world_size, self.dtype, self.on_gpu) if self.zero3 else None
        #: the trained models' weights: fp32 under training.autocast (the forward computes in self.dtype)
        self.weights_dtype = weights = torch.float32 if cfg.training.autocast else self.dtype
        load = dict(dtype=weights, device="cpu", trust_remote_code=cfg.models.trust_remote_code,
                    zero3_config=zero3_config,
                    attn_implementation=resolve_attn_implementation(cfg.models.attn_implementation, self.device))
        self.lora = cfg.training.lora.enabled
        self.strong_dir = spec.strong_base or spec.strong_init  # the base an adapter sits on, under LoRA
        strong = load_causal_lm(self.strong_dir, **load)
        # mix.placement pool: the weak model lives in the pool's actors, never in this process.
        self.pooled = spec.mode == "frozen" and cfg.mix.placement == "pool"
        # a uniform fake weak side (mix.weak_source) runs no weak forward: no weak model is loaded
        uniform = spec.phase == "wmss" and cfg.mix.weak_source == "uniform"
        separate_weak = spec.mode != "sft" and not self.pooled and not spec.weak_shared and not uniform
        # A frozen weak model is never stepped: under autocast it keeps the compute dtype (half the
        # memory) at stages 0-2; ZeRO-3 builds every model under the one zero.Init (fp32).
        weak_dtype = self.dtype if spec.mode == "frozen" and not self.zero3 else weights
        weak = load_causal_lm(spec.weak_init, **{**load, "dtype": weak_dtype}) if separate_weak else None
        for m in (strong, weak):
            if m is not None:
                PairLM.prepare_for_training(m, cfg.training.gradient_checkpointing, lora=self.lora)
        strong, weak, weak_adapter = self._attach_adapters(strong, weak) if self.lora else (strong, weak, None)
        self.pair = PairLM(strong, weak, spec.mode, cfg.mix.lam, zero3=self.zero3, chunk_mb=cfg.mix.loss_chunk_mb(self.on_gpu),
                           weak_pool=self.pooled, shared_weak=spec.weak_shared, weak_adapter=weak_adapter,
                           weak_source=cfg.mix.weak_source if spec.phase == "wmss" else "model",
                           label_smoothing=cfg.training.label_smoothing)
        groups = param_groups(self.pair.trainable_groups(cfg.training.lr, cfg.training.weak_lr),
                              cfg.training.weight_decay)
        self.engine = init_engine(self.pair, groups, training, world_size, spec.plan.total_steps,
                                  self.dtype, self.on_gpu)
        # The rows: 8 bytes per epoch-list entry here, tokens read per step (dataset.RowReader).
        self.epoch_rows = read_epoch_rows(spec.epoch_rows_path)
        if len(self.epoch_rows) != spec.plan.n_per_epoch:
            raise ValueError(f"{spec.epoch_rows_path} has {len(self.epoch_rows)} rows, the plan {spec.plan.n_per_epoch}")
        self.reader = RowReader(spec.tokenized_path)
        # mix.weak_source shuffled: each row's partner row (global row numbers), from the driver
        self.partners = read_partners(storage.join(spec.out_dir, PARTNERS_FILE)) \
            if self.pair.weak_source == "shuffled" else None
        # step s + 1's rows are read in a background thread while step s trains (same rows)
        self.step_rows = ReadAhead(self._read_step_rows, spec.end_step)
        self.pool = self._pooled_weak_side(pool_handles) if self.pooled else None
        # [start, stop) step ranges trained by earlier processes of this run (from the checkpoint),
        # and where this process started: each checkpoint records them (checkpointing.check_trained_all_steps)
        self.segments: list[list[int]] = []
        self.resumed_from = 0
        #: the cumulative token counts of steps 1..the last one trained (metrics.COUNTERS), checkpointed
        self.counters = dict.fromkeys(COUNTERS, 0)

    def _attach_adapters(self, strong, weak):
        """``training.lora``: ``(strong PeftModel, weak model, weak adapter name)``. The strong
        model trains adapter ``default``; a shared weak side runs the ``weak`` adapter (a frozen
        earlier one, or a trained one in joint mode) or none; a separate weak model trains its
        own adapter in joint mode and is used as loaded when frozen."""
        from wmss_ray.models.lora import WEAK, attach_adapters

        spec, lora, seed = self.spec, self.cfg.training.lora, self.cfg.train_seed
        joint = spec.mode == "joint"
        weak_side: str | bool = False
        if spec.weak_shared:
            weak_side = spec.weak_adapter or joint  # frozen iteration 1: the bare base, no adapter
        strong = attach_adapters(strong, lora, self.strong_dir, spec.strong_adapter, weak_side, joint, seed)
        if weak is not None and joint:
            weak = attach_adapters(weak, lora, spec.weak_init, None, False, False, seed + 1)
        return strong, weak, (WEAK if weak_side else None)

    def _pooled_weak_side(self, pool_handles: list | None):
        """``mix.placement: pool``: the weak side as the pool's replies (``weak_pool.feed``)."""
        from wmss_ray.weak_pool.feed import PooledWeakSide
        from wmss_ray.weak_pool.group import PoolClient

        if not pool_handles:
            raise ValueError("mix.placement pool: PhaseWorker needs the pool's replica handles")
        p = self.cfg.mix.pool
        end, every = self.spec.end_step, self.cfg.training.log_every
        return PooledWeakSide(PoolClient(pool_handles, self.rank), self.micro_batches, self.spec.plan.grad_accum,
                              end, lambda step: is_log_step(step + 1, every, end), p.prefetch, p.exact_sample,
                              self.device)

    # ------------------------------------------------------------------ data

    def _read_step_rows(self, step: int) -> list[dict]:
        """This rank's ``grad_accum * micro_batch_size`` tokenised rows of ``step``: one read."""
        global_rows = self.epoch_rows[self.spec.plan.rank_step(step, self.rank)]
        rows = self.reader.rows(global_rows)
        if self.partners is not None:  # shuffled weak side: the partner rows, read with the step's
            for row, partner in zip(rows, self.reader.rows(self.partners[global_rows])):
                row["partner"] = partner
        return rows

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor | int]]:
        """The ``grad_accum`` micro-batches of this rank for optimizer step ``step``: padded
        ``{input_ids, attention_mask, labels} [B, T]``, or packed ``{input_ids, position_ids,
        labels} [1, L]`` (+ ``cu_seq_lens [n_rows + 1]``, ``max_length``) with
        ``training.packing`` (same rows either way). The rows were read ahead during step - 1."""
        plan = self.spec.plan
        rows = self.step_rows(step)
        mb = plan.micro_batch_size
        groups = [rows[a * mb:(a + 1) * mb] for a in range(plan.grad_accum)]
        batches = [pack_rows(g) for g in groups] if self.cfg.training.packing else [collate(g, self.pad_id) for g in groups]
        if self.partners is not None:
            for b, g in zip(batches, groups):
                b["weak_batch"] = partner_batch(g, [r["partner"] for r in g], self.pad_id)
        return batches

    # ------------------------------------------------------------------ step

    @property
    def _own_grad_norm(self) -> bool:
        # DeepSpeed's stage-0 path over fp32 weights (fp32 models, or training.autocast) clips
        # without keeping the norm; the ZeRO / bf16 optimizers record it (engine.get_global_grad_norm).
        return self.cfg.training.zero_stage == 0 and self.weights_dtype == torch.float32

    def _grad_norm(self) -> float:
        """2-norm of the (already all-reduced) gradients, before clipping; stage 0 only."""
        norms = [p.grad.detach().float().norm() for p in self.pair.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    @property
    def lr(self) -> float:
        """Current lr of the strong model's parameters (the first param group)."""
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (``step`` is 0-based); returns its globally reduced metrics."""
        t0 = time.perf_counter()
        mbs = self.pool.micro_batches(step) if self.pool else self.micro_batches(step)  # pool: the requested ones
        # Prefetched: the global answer-token count must be known before the first backward.
        counts = torch.tensor([sum(answer_tokens(b) for b in mbs), sum(input_tokens(b) for b in mbs)],
                              dtype=torch.float64, device=self.device)
        all_reduce_sum(counts)
        n_global = float(counts[0])
        loss_scale = float(self.world_size * self.spec.plan.grad_accum)
        lr = self.lr
        stats = LossStats.zeros(self.device)
        grad_norm = None
        for i, b in enumerate(mbs):
            # the answer positions found on the host, from the collated batch: no device sync
            b = {**b, "answer_pos": answer_positions(b["labels"])}
            b = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            loss, mb_stats = self._forward(b, step, i, n_global, loss_scale)
            self.engine.backward(loss)
            if i == len(mbs) - 1 and self._own_grad_norm:
                grad_norm = self._grad_norm()
            self.engine.step()
            stats.add_(mb_stats)
        stats = all_reduce_stats(stats)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        if torch.is_tensor(grad_norm):
            grad_norm = float(grad_norm)
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        metrics = step_metrics(stats, step=step + 1, phase=self.spec.phase, grad_norm=grad_norm, lr=lr,
                               step_time=dt, input_tokens=float(counts[1]),
                               samples_seen=(step + 1) * self.spec.plan.global_batch)
        self.counters = add_counters(self.counters, metrics)
        metrics.update(self.counters)
        if self.pool:
            metrics.update(pool_metrics(stats, self.pool.checkpoint_id, self.cfg.mix.pool.error_warn))
        return metrics

    def _forward(self, b: dict[str, torch.Tensor], step: int, a: int, num_tokens: float,
                 loss_scale: float) -> tuple[torch.Tensor, LossStats]:
        """The engine's ``(loss, stats)`` of micro-batch ``a`` of ``step``: padded
        ``{input_ids, attention_mask, labels}`` or packed ``{input_ids, position_ids, labels,
        cu_seq_lens, max_length}`` (the boundaries go to varlen kernels: ``PairLM._hidden``);
        under ``mix.placement: pool`` with the pool's reply for it (and its transfer costs)."""
        reply = self.pool.reply(step, a) if self.pool else None
        pool_in = dict(weak_logp=reply.weak, exact=reply.exact) if reply else {}
        if "weak_batch" in b:  # shuffled: the partner rows, to this device
            pool_in["weak_batch"] = {k: v.to(self.device, non_blocking=True) for k, v in b["weak_batch"].items()}
        if self.pair.weak_source == "entropy_matched":  # global micro-batch a*W + r: the same rows at any W
            pool_in["weak_key"] = (self.cfg.curriculum_seed, step, a * self.world_size + self.rank)
        loss, stats = self.engine(b["input_ids"], b.get("attention_mask"), b["labels"], num_tokens=num_tokens,
                                  loss_scale=loss_scale, position_ids=b.get("position_ids"),
                                  answer_pos=b.get("answer_pos"), cu_seq_lens=b.get("cu_seq_lens"),
                                  max_length=b.get("max_length"), **pool_in)
        if reply:
            stats.add_pool_reply(reply.nbytes, reply.wait_s)
        return loss, stats

    # ------------------------------------------------------------------ state

    def save(self, ckpt_dir: str, step: int, samples_seen: int) -> str:
        from wmss_ray.training.checkpointing import save_checkpoint

        state = {"step": step, "samples_seen": samples_seen, "phase": self.spec.phase,
                 "plan": self.spec.plan_fingerprint(), "layout": self.layout, "fingerprint": self.spec.fingerprint,
                 "segments": self.segments + [[self.resumed_from, step]], **self.counters}
        return save_checkpoint(self.engine, ckpt_dir, self.rank, state, exclude_frozen=self._exclude_frozen)

    @property
    def _exclude_frozen(self) -> bool:
        # frozen weights (the frozen weak model, a LoRA base) are rebuilt from their directories
        return self.spec.mode == "frozen" or self.lora

    def load(self, ckpt_dir: str) -> int:
        """Restore from a checkpoint directory of this run (same fingerprint, same global batch; any
        world size and ZeRO stage >= 1, or stage 0 to stage 0); returns the number of completed steps."""
        from wmss_ray.training.checkpointing import load_checkpoint

        state = load_checkpoint(self.engine, ckpt_dir, self.rank, exclude_frozen=self._exclude_frozen,
                                expect=self.spec.plan_fingerprint(), fingerprint=self.spec.fingerprint,
                                layout=self.layout, staging=self.cfg.training.staging_dir)
        self.segments, self.resumed_from = [list(s) for s in state.get("segments", [])], int(state["step"])
        self.counters = resumed_counters(state)
        return int(state["step"])

    def export(self, out_dir: str) -> str | None:
        """Export the strong model as a plain HF directory (collective; rank 0 writes); under
        ``training.lora`` the merged model, with the adapter in ``adapter/`` (``models.lora``)."""
        from wmss_ray.training.checkpointing import export_strong, gather_state_dict

        if not self.lora:
            return export_strong(self.pair.strong, self.tokenizer, out_dir, self.zero3, self.rank)
        from wmss_ray.models.lora import export_lora

        state = gather_state_dict(self.pair.strong, self.zero3, self.rank)  # collective under ZeRO-3
        if self.rank != 0:
            return None
        return export_lora(self.pair.strong, self.tokenizer, out_dir, state, self.strong_dir)

    def strong_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full strong state dict on rank 0 (collective under ZeRO-3)."""
        from wmss_ray.training.checkpointing import gather_state_dict

        return gather_state_dict(self.pair.strong, self.zero3, self.rank)
