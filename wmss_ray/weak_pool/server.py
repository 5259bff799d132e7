"""``WeakServer``: the frozen weak model answering :class:`~.wire.WeakRequest` s (plain, no Ray).

The model is loaded safely (``models.loading``: local directory, safetensors, no remote code
unless asked). With ``zero3=True`` it is wrapped in a DeepSpeed ZeRO-3 engine with no optimizer
(ZeRO inference: each rank holds ``1/S`` of every parameter, gathered module by module during
the forward) over the *current default* ``torch.distributed`` process group, which the caller
(``group.py``'s shard actors) creates for the replica alone. Every rank of that group must call
:meth:`WeakServer.answer` the same number of times (ZeRO-3's gathers are collectives).

A packed request (``[1, L]`` with ``position_ids``, no mask) is forwarded as
``training.pair.PairLM._hidden`` forwards the strong model: sdpa/eager keep attention inside
each row from the position ids; a varlen kernel (flash-attention 2) gets the rows' boundaries,
read from the position ids on the host (``models/varlen.py``).

The logits are computed chunk by chunk over the answer positions (``[chunk, V]`` at a time),
as the training loss does; only the reply's arrays are ``[N, ...]``.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from wmss_ray.losses.chunk_ops import row_logsumexp
from wmss_ray.models.ds_comm import init_deepspeed_comm
from wmss_ray.losses.mixing import DEFAULT_CHUNK_MB, chunk_rows_for
from wmss_ray.losses.weak_side import weak_from_logp
from wmss_ray.weak_pool.wire import WeakReply, WeakRequest


#: One padded row of one token (id 0, valid in any vocabulary) and no answer positions: the whole
#: forward and the output head's gather run, and the reply is empty.
_FILLER = WeakRequest(input_ids=np.zeros((1, 1), np.int32), lengths=np.ones(1, np.int32),
                      positions=np.zeros(0, np.int32), labels=np.zeros(0, np.int32))


def pool_dtype(models_dtype: str, gpus_per_actor: float) -> str:
    """The pool's forward dtype: ``models.dtype``; for "auto", bf16 on GPU actors, fp32 on CPU."""
    if models_dtype != "auto":
        return models_dtype
    return "bfloat16" if gpus_per_actor > 0 else "float32"


def checkpoint_id(model_dir: str | Path) -> str:
    """A short content id of a model directory: sha256 of each safetensors file's name, size and
    first MiB (cheap on multi-GB shards, and changes whenever the weights are rewritten)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
    return h.hexdigest()[:16]


class WeakServer:
    """The frozen weak model; :meth:`answer` turns a request into a reply.

    Args:
        model_dir: local HF causal-LM directory (safetensors).
        top_k: log-probs per answer position (0: dense ``[N, V]``, exact).
        dtype: "auto" | "float32" | "bfloat16" | "float16" (the forward's dtype; replies are fp32).
        device: where the forward runs.
        chunk_size: answer positions per ``[chunk, V]`` logits block, for tests that want many
            small blocks; None/0 (the pool): sized from ``chunk_mb`` (``mix.chunk_mb``, as the
            training loss) by ``losses.mixing.chunk_rows_for``.
        zero3: shard the model with DeepSpeed ZeRO-3 over the default process group.
        ds_overrides: merged into the ZeRO-3 config (e.g. ``stage3_param_persistence_threshold``).
        attn_implementation: ``models.attn_implementation``; "auto" is resolved for ``device``
            (flash-attention 2 on a GPU when installed: packed rows then run varlen).
    """

    def __init__(self, model_dir: str, top_k: int, dtype: str = "float32", device: str = "cpu",
                 trust_remote_code: bool = False, chunk_size: int | None = None, zero3: bool = False,
                 ds_overrides: dict | None = None, chunk_mb: float = DEFAULT_CHUNK_MB,
                 attn_implementation: str = "auto"):
        from wmss_ray.io import storage
        from wmss_ray.models.loading import load_causal_lm, output_head, resolve_attn_implementation, resolve_dtype

        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 1 (or None/0: sized from chunk_mb), got {chunk_size}")
        self.top_k, self.chunk_size, self.chunk_mb, self.zero3 = int(top_k), chunk_size or None, chunk_mb, zero3
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model_dir = storage.local_model_dir(model_dir)  # a storage URI: this node's cached copy
        self.checkpoint_id = checkpoint_id(model_dir)
        # Resolved for the forward's device (a ZeRO-3 shard's partitions live there too).
        attn = resolve_attn_implementation(attn_implementation, self.device)
        config = None
        if zero3:
            zero = {"stage": 3, **(ds_overrides or {})}
            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
                      "bf16": {"enabled": self.dtype == torch.bfloat16},
                      "fp16": {"enabled": self.dtype == torch.float16}, "steps_per_print": 10**9}
        # ZeRO-3: built under zero.Init and scattered module by module (models/zero3_loading.py),
        # so no shard ever holds the whole weak model on its host (S shards: ~1/S each).
        model = load_causal_lm(model_dir, dtype=self.dtype, device=self.device, trust_remote_code=trust_remote_code,
                               attn_implementation=attn, zero3_config=config)
        model.requires_grad_(False)
        model.eval()
        model.config.use_cache = False
        head = output_head(model)[1]  # [V, D]; under zero.Init a placeholder whose full shape is ds_shape
        self.vocab = int(getattr(head, "ds_shape", head.shape)[0])
        if zero3:
            import deepspeed

            init_deepspeed_comm()  # a no-op after load_causal_lm's zero.Init; initialize must find it running
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            model = engine.module
        self.model = model
        self.forwards = 0  # forwards run, fillers included (every shard of a replica must count the same)
        self.rows_served = 0  # sequence rows forwarded for a reply (fillers not counted)
        self.tokens_served = 0  # their real tokens (padding not counted)

    def held_numel(self) -> int:
        """Parameter elements this process holds (its ZeRO-3 partition; everything when S = 1)."""
        return sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in self.model.parameters())

    @contextmanager
    def _head_weight(self):
        """``[V, D]``, whole: gathered from the shards under ZeRO-3 for the duration of the block."""
        from wmss_ray.models.loading import output_head

        w = output_head(self.model)[1]
        if not self.zero3:
            yield w
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([w]):
            yield w

    def served(self) -> dict[str, int]:
        """What this server has done: ``forwards`` (fillers included), ``rows`` and ``tokens``
        served (a sharded replica's balance: each shard serves about ``1/S`` of the rows)."""
        return {"forwards": self.forwards, "rows": self.rows_served, "tokens": self.tokens_served}

    def answer(self, req: WeakRequest) -> WeakReply:
        """The reply for one micro-batch (see ``wire.py`` for the arrays)."""
        reply = self._reply(req)
        self.forwards += 1
        self.rows_served += req.input_ids.shape[0] if not req.packed else int((req.position_ids[0] == 0).sum())
        self.tokens_served += req.input_ids.shape[1] if req.packed else int(req.lengths.sum())
        return reply

    def join(self) -> None:
        """A forward on a one-token filler, its reply dropped: how a ZeRO-3 shard with no rows of
        this request (fewer rows than shards) still joins the replica's gathers, which are
        collectives (``weak_pool.slices``)."""
        self._reply(_FILLER)
        self.forwards += 1

    @torch.no_grad()
    def _reply(self, req: WeakRequest) -> WeakReply:
        from wmss_ray.models.loading import output_head
        from wmss_ray.models.varlen import attention_kwargs, boundaries_from_position_ids

        ids = torch.from_numpy(req.input_ids.astype(np.int64)).to(self.device)  # [B, T] (a copy: writable)
        b, t = ids.shape
        varlen = {}
        if req.packed:  # [1, L], no mask: the decoder keeps attention inside each row (as PairLM._hidden)
            mask, position_ids = None, torch.from_numpy(req.position_ids.astype(np.int64)).to(self.device)
            cu_seq_lens, max_length = boundaries_from_position_ids(req.position_ids)  # host numpy: no sync
            varlen = attention_kwargs(self.model, cu_seq_lens.to(self.device), max_length)
        else:
            mask = (torch.arange(t, device=self.device).unsqueeze(0)
                    < torch.from_numpy(req.lengths.astype(np.int64)).to(self.device).unsqueeze(1)).long()
            position_ids = None
        decoder, _ = output_head(self.model)
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False, **varlen).last_hidden_state  # [B, T, D]
        pos = torch.from_numpy(req.positions.astype(np.int64)).to(self.device)
        h = hidden.reshape(b * t, -1).index_select(0, pos)  # [N, D]
        labels = torch.from_numpy(req.labels.astype(np.int64)).to(self.device)  # [N]
        n, k, v = pos.numel(), min(self.top_k, self.vocab), self.vocab
        exact_rows = torch.from_numpy(req.exact_rows.astype(np.int64))
        reply = WeakReply(self.checkpoint_id, v, k)  # top_k > V ships V (an empty tail)
        if self.top_k == 0:
            reply.dense_logp = np.empty((n, v), np.float32)
        else:
            reply.topk_logp, reply.topk_ids = np.empty((n, k), np.float32), np.empty((n, k), np.int32)
            reply.label_logp, reply.tail_logmass = np.empty(n, np.float32), np.empty(n, np.float32)
        if exact_rows.numel():
            reply.exact_logp = np.empty((exact_rows.numel(), v), np.float32)
        chunk = self.chunk_size or chunk_rows_for(n, v, self.chunk_mb)
        with self._head_weight() as w:
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                # [c, V] logits in the model dtype, one fp32 copy normalised in place (row-blocked
                # logsumexp): no further [c, V] temporaries.
                logp = torch.mm(h[start:stop], w.t()).float()
                logp.sub_(row_logsumexp(logp, logp.dtype).unsqueeze(1))  # [c, V] fp32 log-probs
                weak = weak_from_logp(logp, labels[start:stop], self.top_k)
                if self.top_k == 0:
                    reply.dense_logp[start:stop] = weak.dense.cpu().numpy()
                else:
                    reply.topk_logp[start:stop] = weak.topk_logp.cpu().numpy()
                    reply.topk_ids[start:stop] = weak.topk_ids.cpu().numpy()
                    reply.label_logp[start:stop] = weak.label_logp.cpu().numpy()
                    reply.tail_logmass[start:stop] = weak.tail_logmass.cpu().numpy()
                here = ((exact_rows >= start) & (exact_rows < stop)).nonzero().squeeze(1)
                if here.numel():
                    rows = (exact_rows[here] - start).to(self.device)
                    reply.exact_logp[here.numpy()] = logp.index_select(0, rows).cpu().numpy()
        return reply
