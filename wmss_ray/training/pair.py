"""The weak/strong pair as one ``nn.Module`` whose forward computes the WMSS loss.

Why the loss lives inside a module's forward: under ZeRO-3 every parameter is partitioned and
is only whole between its owning module's pre-forward gather and post-forward release. The
mixed loss multiplies the final hidden states by the LM-head weights *outside* the heads' own
``forward`` (``losses.mixing.chunked_mixed_ce`` never materialises ``[N, V]`` logits), so the head
weights are registered as external parameters of this module: DeepSpeed gathers them for
:meth:`PairLM.forward` (and again for its backward) on every rank. Tied embeddings need nothing
special: the head weight *is* the embedding weight, registered the same way.

Modes: ``sft`` (strong only), ``joint`` (both trained, one optimizer with per-model lr),
``frozen`` (weak under ``no_grad``, its parameters ``requires_grad=False``: never in the
optimizer, partitioned alongside the strong one at ZeRO-3, a plain replica at stages 0-2).

``shared_weak`` (LoRA, ``training.lora``): the weak model is the strong model's own base, run
with the strong adapter switched off (``weak_adapter`` None) or with the ``"weak"`` adapter
(``models.lora.adapter_scope``): one copy of the base weights serves both sides.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from wmss_ray.losses.fake_weak import FAKE_WEAK_SOURCES, entropy_matched_weak, uniform_weak
from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB, chunk_rows_for, chunked_mixed_ce, sparse_mixed_ce
from wmss_ray.losses.positions import answer_positions
from wmss_ray.losses.stats import LossStats
from wmss_ray.losses.weak_side import WeakLogProbs, truncation_error
from wmss_ray.models.loading import output_head
from wmss_ray.models.varlen import attention_kwargs


#: ``mix.weak_source`` values besides "model": the distributions of ``losses.fake_weak`` and the
#: real weak logits of other rows (``training.shuffled_weak``).
WEAK_SOURCES = (*FAKE_WEAK_SOURCES, "shuffled")


class PairLM(nn.Module):
    """Strong causal LM (+ optional weak one) and the chunked mixed CE in one forward.

    Args:
        strong, weak: HF causal LMs sharing the vocabulary; ``weak`` is None for SFT.
        mode: "sft" | "joint" | "frozen".
        lam: mixing weight (1.0 is plain SFT even with a weak model).
        chunk_size: answer tokens per chunk of the loss, for tests that want many small chunks;
            None (training): sized from ``chunk_mb``.
        zero3: register the heads as ZeRO-3 external parameters.
        chunk_mb: MiB budget of the loss's ``[chunk, V]`` fp32 buffer (``mix.chunk_mb``, the one
            way the config sizes it).
        weak_pool: ``mix.placement: pool``: no weak model here (``weak`` None, mode frozen);
            :meth:`forward` takes the weak side as the pool's log-probs.
        shared_weak: the weak side is ``strong`` (a ``PeftModel``) run with adapter
            ``weak_adapter`` alone (None: no adapter, the bare base); ``weak`` is None.
        weak_source: ``mix.weak_source``: "model" (the weak model's logits), or a control's fake
            weak side (``losses.fake_weak``): "uniform" (no weak forward) or "entropy_matched"
            (the weak forward gives each row's entropy only) or "shuffled" (the weak model's
            logits of each row's partner row: ``forward(weak_batch=...)``,
            ``training.shuffled_weak``). Frozen mode only.
        label_smoothing: ``training.label_smoothing`` of the (mixed) CE (the SFT label-smoothing
            control); the statistics keep the plain CE.
    """

    def __init__(self, strong: nn.Module, weak: nn.Module | None, mode: str, lam: float,
                 chunk_size: int | None = None, zero3: bool = False, chunk_mb: float = DEFAULT_CHUNK_MB,
                 weak_pool: bool = False, shared_weak: bool = False, weak_adapter: str | None = None,
                 weak_source: str = "model", label_smoothing: float = 0.0):
        super().__init__()
        if weak_source != "model" and (mode != "frozen" or weak_pool or weak_source not in WEAK_SOURCES):
            raise ValueError(f"weak_source {weak_source!r}: one of {WEAK_SOURCES}; a fake weak side "
                             f"needs mode frozen and the colocated placement (got mode {mode!r}, pool {weak_pool})")
        self.weak_source = weak_source
        self._amp: torch.dtype | None = None  # the autocast dtype of the running forward
        if mode not in ("sft", "joint", "frozen"):
            raise ValueError(f"mode must be sft, joint or frozen, got {mode!r}")
        if weak_pool and (mode != "frozen" or weak is not None):
            raise ValueError("weak_pool: the weak model is served by the pool (mode frozen, weak=None here)")
        if shared_weak and (mode == "sft" or weak is not None or weak_pool):
            raise ValueError("shared_weak: the weak side is the strong model's base (joint or frozen, weak=None)")
        no_weak_needed = weak_pool or shared_weak or weak_source == "uniform"  # uniform: no weak forward at all
        if (mode == "sft" and weak is not None) or (mode != "sft" and weak is None and not no_weak_needed):
            raise ValueError(f"mode {mode!r} {'takes no' if mode == 'sft' else 'needs a'} weak model")
        self.weak_pool = weak_pool  # forward takes the weak side as log-probs (weak_pool/wire.py)
        self.strong = strong
        self.weak = weak
        self.shared_weak, self.weak_adapter = shared_weak, weak_adapter
        self.mode = mode
        self.lam = 1.0 if mode == "sft" else float(lam)
        self.chunk_size = chunk_size
        self.chunk_mb = chunk_mb
        self.label_smoothing = float(label_smoothing)
        if weak is not None and mode == "frozen":
            weak.requires_grad_(False)
            weak.eval()  # no dropout in the frozen model
        if zero3:
            import deepspeed

            for model in (strong, weak):
                if model is not None:
                    deepspeed.zero.register_external_parameter(self, output_head(model)[1])

    # The decoder is looked up on each call, never stored as a second attribute: registering the
    # same submodule twice would give ZeRO-3 two owners for its parameters.
    def _hidden(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, pos: torch.Tensor, cu_seq_lens: torch.Tensor | None = None,
                max_length: int | None = None) -> torch.Tensor:
        """Final hidden states (after the final norm) of the flat positions ``pos [N]``: ``[N, D]``.

        ``cu_seq_lens [n_rows + 1]`` int32, ``max_length``: a packed batch's boundaries, passed to
        the decoder as ``FlashAttentionKwargs`` when its kernel takes them (``models/varlen.py``);
        mask-path kernels (sdpa, eager) keep rows apart from ``position_ids`` instead."""
        decoder, _ = output_head(model)
        varlen = attention_kwargs(model, cu_seq_lens, max_length)
        amp = self._amp
        # No cast cache: each weight is cast once per forward anyway, and a cached bf16 copy would
        # outlive ZeRO-3's release of the weight until the forward ends (2 bytes per parameter).
        with torch.autocast(input_ids.device.type, dtype=amp, cache_enabled=False) if amp else nullcontext():
            h = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, **varlen).last_hidden_state  # [B, T, D]
        h = h.reshape(-1, h.shape[-1]).index_select(0, pos)
        return h.to(amp) if amp else h

    def _head(self, model: nn.Module) -> torch.Tensor:
        """The LM head weight ``[V, D]``, in the autocast dtype under autocast (as autocast hands
        it to the head's matmul in a plain forward; the cast is differentiable)."""
        w = output_head(model)[1]
        return w.to(self._amp) if self._amp else w

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                num_tokens: float, loss_scale: float = 1.0, position_ids: torch.Tensor | None = None,
                weak_logp: WeakLogProbs | None = None,
                exact: tuple[torch.Tensor, torch.Tensor] | None = None,
                answer_pos: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                max_length: int | None = None, weak_key: tuple[int, ...] = (),
                weak_batch: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, LossStats]:
        """Mixed CE of one micro-batch, padded or packed, in every placement.

        Args:
            input_ids, attention_mask, labels: ``[B, T]`` (labels unshifted, -100 off-answer).
                A packed micro-batch (``training/packing.py``) is ``[1, L]`` with no attention
                mask and ``position_ids [1, L]`` restarting per row: the decoders then keep
                attention inside each row.
            num_tokens: the divisor: answer tokens of the whole optimizer step (all ranks, all
                micro-batches), so that the summed gradients are those of the global token mean.
            loss_scale: multiplies the returned loss only for backward (undoes DeepSpeed's own
                averaging over ranks and micro-batches; see ``worker.PhaseWorker.train_step``).
            weak_logp: ``weak_pool`` only: the pool's reply for the answer positions
                (``losses.weak_side.WeakLogProbs``, rows in ``labels[:, 1:] != -100`` order).
            exact: ``weak_pool`` only, optional: ``(rows [n], exact weak log-probs [n, V])`` of a
                sample of those positions, to measure the top-k truncation error.
            answer_pos: ``losses.positions.answer_positions(labels)`` ``[N]`` on this device, as
                the worker computes it on the host from the collated batch; None: computed here
                from the device labels, one device-to-host sync.
            cu_seq_lens, max_length: a packed micro-batch's row boundaries (``int32 [n_rows + 1]``
                on this device) and longest row (an int), as ``pack_rows`` computes them on the
                host; handed to varlen attention kernels (flash-attention 2), unused by sdpa/eager.
            weak_key: ``weak_source: entropy_matched``: the seed key of this micro-batch's spike
                tokens, ``(seed, step, global micro-batch index)`` (``losses.fake_weak.spike_ids``).
            weak_batch: ``weak_source: shuffled``: the partner rows (``shuffled_weak.partner_batch``:
                ``input_ids, attention_mask, labels [B, T_p]``, ``answer_pos [M]``, ``weak_index
                [N]``) on this device.

        Returns:
            ``(loss, stats)``: 0-dim loss ``sum(token CE) / num_tokens * loss_scale`` and the
            detached :class:`~wmss_ray.losses.stats.LossStats` of this micro-batch (sums over
            its answer tokens; the pool's truncation fields filled under ``weak_pool``).
        """
        # Under torch.autocast (training.autocast: fp32 weights, DeepSpeed's torch_autocast) only
        # the decoders run autocast; the loss gets their outputs and the head weights cast to the
        # autocast dtype and runs outside it, exactly as on bf16 weights (its own fp32 accumulation).
        device = input_ids.device.type
        self._amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False) if self._amp else nullcontext():
            return self._loss(input_ids, attention_mask, labels, num_tokens, loss_scale, position_ids, weak_logp,
                              exact, answer_pos, cu_seq_lens, max_length, weak_key, weak_batch)

    def _loss(self, input_ids, attention_mask, labels, num_tokens, loss_scale, position_ids, weak_logp, exact,
              answer_pos, cu_seq_lens, max_length, weak_key, weak_batch) -> tuple[torch.Tensor, LossStats]:
        """:meth:`forward`'s body (same arguments), with ``self._amp`` set."""
        # Position p predicts token p+1: keep only answer positions so that the decoders' outputs
        # feed the loss for those rows alone, gathered by index (a boolean mask would be a
        # device-to-host sync per use).  pos, y: [N]
        pos = answer_positions(labels) if answer_pos is None else answer_pos
        y = labels.reshape(-1).index_select(0, pos + 1)
        varlen = dict(cu_seq_lens=cu_seq_lens, max_length=max_length)
        h_s = self._hidden(self.strong, input_ids, attention_mask, position_ids, pos, **varlen)  # [N, D_s]
        w_s = self._head(self.strong)  # [V, D_s]
        # every row is an answer row: the loss need not look for them on the device
        sizing = dict(chunk_size=self.chunk_size, num_tokens=num_tokens, return_stats=True, chunk_mb=self.chunk_mb,
                      valid_rows=torch.arange(pos.numel(), device=pos.device), label_smoothing=self.label_smoothing)
        if self.weak_pool:
            if weak_logp is None:
                raise ValueError("PairLM(weak_pool=True).forward needs weak_logp (the pool's reply)")
            loss, stats = sparse_mixed_ce(h_s, w_s, weak_logp, y, self.lam, **sizing)
            if exact is not None and exact[0].numel():
                stats.add_sampled_rows(*self._sampled_error(h_s, w_s, y, weak_logp, *exact))
            return loss * loss_scale, stats
        if self.weak_source != "model":
            return self._fake_weak_loss(h_s, w_s, y, input_ids, attention_mask, position_ids, pos, varlen, sizing,
                                        weak_key, loss_scale, weak_batch)
        h_w = w_w = None
        if (self.weak is not None or self.shared_weak) and self.lam != 1.0:
            weak = self.strong if self.shared_weak else self.weak
            # frozen: no graph; shared: the same modules with the weak adapter (or none) switched in
            with torch.no_grad() if self.mode == "frozen" else nullcontext(), self._weak_scope():
                h_w = self._hidden(weak, input_ids, attention_mask, position_ids, pos, **varlen)  # [N, D_w]
            w_w = self._head(weak)  # [V, D_w]
        loss, stats = chunked_mixed_ce(h_s, w_s, h_w, w_w, y, self.lam, **sizing)
        return loss * loss_scale, stats

    def _fake_weak_loss(self, h_s, w_s, y, input_ids, attention_mask, position_ids, pos, varlen, sizing, weak_key,
                        loss_scale, weak_batch):
        """The mixed CE against a control's fake weak side: the partner rows' weak hidden states
        (shuffled), or ``losses.fake_weak``'s distributions through the pool's exact top-k path
        (``sparse_mixed_ce``: their tails are uniform)."""
        vocab = w_s.shape[0]
        model = self.strong if self.shared_weak else self.weak
        if self.weak_source == "shuffled":
            if weak_batch is None:
                raise ValueError("PairLM(weak_source='shuffled').forward needs weak_batch (the partner rows)")
            with torch.no_grad(), self._weak_scope():
                h_p = self._hidden(model, weak_batch["input_ids"], weak_batch["attention_mask"], None,
                                   weak_batch["answer_pos"])  # [M, D_w]: the partners' answer positions
                h_w = h_p.index_select(0, weak_batch["weak_index"])  # [N, D_w]
            loss, stats = chunked_mixed_ce(h_s, w_s, h_w, self._head(model), y, self.lam, **sizing)
            return loss * loss_scale, stats
        if self.weak_source == "uniform":
            weak = uniform_weak(y, vocab)
        else:  # entropy_matched: the real weak forward, for each row's entropy only
            with torch.no_grad(), self._weak_scope():
                h_w = self._hidden(model, input_ids, attention_mask, position_ids, pos, **varlen)  # [N, D_w]
                w_w = self._head(model)
                rows = chunk_rows_for(h_w.shape[0], vocab, self.chunk_mb) if self.chunk_size is None else self.chunk_size
                weak = entropy_matched_weak(h_w, w_w, y, weak_key, rows)
        loss, stats = sparse_mixed_ce(h_s, w_s, weak, y, self.lam, **sizing)
        return loss * loss_scale, stats

    def _weak_scope(self):
        if not self.shared_weak:
            return nullcontext()
        from wmss_ray.models.lora import adapter_scope

        return adapter_scope(self.strong, self.weak_adapter)

    def _sampled_error(self, h_s, w_s, y, weak_logp: WeakLogProbs, rows: torch.Tensor, exact_logp: torch.Tensor):
        """Measured truncation error and its bound ``[n]`` on the sampled answer rows ``rows [n]``
        (their ``[n, V]`` strong logits only: n is ``mix.pool.exact_sample``, small)."""
        with torch.no_grad():
            return truncation_error(h_s.detach()[rows] @ w_s.detach().t(), weak_logp.rows(rows), exact_logp,
                                    y[rows], self.lam)

    @staticmethod
    def prepare_for_training(model: nn.Module, gradient_checkpointing: bool, lora: bool = False) -> None:
        """Train mode, no KV cache, and (``training.gradient_checkpointing``) non-reentrant
        activation checkpointing of every decoder layer: the layer is recomputed in backward
        from its input, so only layer inputs stay alive across the forward. Non-reentrant
        (``torch.utils.checkpoint(use_reentrant=False)``) works with inputs that need no grad
        and with ZeRO-3's parameter hooks. ``lora``: the model gets adapters next; a layer is
        recomputed with the adapter its forward ran with (``models.lora.recompute_context``)."""
        model.config.use_cache = False
        model.train()
        if gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if lora:
                from wmss_ray.models.lora import recompute_context

                kwargs["context_fn"] = recompute_context(model)
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def trainable_groups(self, lr: float, weak_lr: float | None) -> dict[str, tuple[nn.Module, float]]:
        """``{"strong": (module, lr), "weak": (module, weak_lr or lr)}`` for the optimizer (joint only)."""
        weak_lr = weak_lr if weak_lr is not None else lr
        if self.shared_weak and self.mode == "joint":  # two adapters on one module: split by adapter
            from wmss_ray.models.lora import TRAINED, AdapterParams

            return {"strong": (AdapterParams(self.strong, TRAINED), lr),
                    "weak": (AdapterParams(self.strong, self.weak_adapter), weak_lr)}
        groups = {"strong": (self.strong, lr)}
        if self.weak is not None and self.mode == "joint":
            groups["weak"] = (self.weak, weak_lr)
        return groups
