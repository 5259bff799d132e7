"""What travels between a Train worker and the weak pool: numpy arrays, never ``[B, T, V]``.

A :class:`WeakRequest` is one micro-batch: its int32 token ids, either row lengths (padded
``[B, T]``, right padding as ``data.tokenize.collate`` makes it) or, for a packed micro-batch
(``training/packing.py``: ``[1, L]``, no mask), its int32 ``position_ids [1, L]`` restarting per
row, and the *answer positions* (flat ``b * T + t`` of the position ``t`` that predicts the
answer token ``t + 1``) with their labels. A
:class:`WeakReply` holds, for those positions only and in the same order:

====================  =======  ==========  =============================================
array                 dtype    shape       meaning
====================  =======  ==========  =============================================
``topk_logp``         float32  ``[N, k]``  the k largest weak log-probs
``topk_ids``          int32    ``[N, k]``  their token ids
``label_logp``        float32  ``[N]``     the label's weak log-prob (exact, in top-k or not)
``tail_logmass``      float32  ``[N]``     logsumexp of the log-probs outside top-k and label
``dense_logp``        float32  ``[N, V]``  ``top_k: 0`` only, instead of the four above
``exact_logp``        float32  ``[n, V]``  dense rows of ``exact_rows`` (measured error)
====================  =======  ==========  =============================================

plus ``checkpoint_id`` (which weak model answered). So an answer position costs
``8 k + 8`` bytes (520 B at k = 64) against ``2 V`` for bf16 logits (303,872 B at
V = 151,936: 584x less); see :func:`reply_bytes`. The reconstruction of the weak side from a
reply (top-k in place, tail mass spread uniformly, label exact) is
``losses.weak_side``'s, chunk by chunk inside the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from wmss_ray.losses.positions import answer_positions
from wmss_ray.losses.weak_side import WeakLogProbs


def reply_bytes(n_positions: int, top_k: int, vocab: int, n_exact: int = 0) -> int:
    """Exact array bytes of a reply (``top_k == 0``: dense); ``checkpoint_id`` not counted."""
    per = 4 * vocab if top_k == 0 else 8 * top_k + 8
    return n_positions * per + n_exact * 4 * vocab


def device_reply_bytes(n_positions: int, top_k: int, vocab: int, n_exact: int = 0) -> int:
    """Bytes a reply takes on the Train worker's device (``WeakReply.to_weak`` and ``exact``):
    :func:`reply_bytes` with the top-k ids widened to int64 (``12 k + 8`` per position) and the
    exact rows' int64 row numbers (``4 V + 8`` per exact row)."""
    per = 4 * vocab if top_k == 0 else 12 * top_k + 8
    return n_positions * per + n_exact * (4 * vocab + 8)


def request_bytes(batch: int, seq: int, n_positions: int, n_exact: int = 0, packed: bool = False) -> int:
    """Exact array bytes of a request: ids ``4 B T``, then lengths ``4 B`` (padded) or
    position_ids ``4 B T`` (packed, ``B = 1``), positions + labels ``8 N``, exact rows ``4 n``."""
    layout = 4 * batch * seq if packed else 4 * batch
    return 4 * batch * seq + layout + 8 * n_positions + 4 * n_exact


def _check_packed_positions(position_ids: torch.Tensor) -> None:
    """``[1, L]``: 0 first, then each position either the previous + 1 or 0 (a new row)."""
    pos = position_ids[0]
    step = pos[1:] - pos[:-1]
    if pos.numel() and (pos[0] != 0 or not bool(((step == 1) | (pos[1:] == 0)).all())):
        raise ValueError("weak pool requests of a packed micro-batch need position_ids [1, L] that start at 0 "
                         "and either grow by 1 or restart at 0 (a new row), as training.packing.pack_rows makes them")


@dataclass
class WeakRequest:
    """One micro-batch for the weak model (int32 numpy arrays)."""

    input_ids: np.ndarray  # [B, T] (packed: [1, L])
    lengths: np.ndarray | None  # [B] tokens per row (right-padded); None when packed
    positions: np.ndarray  # [N] flat b * T + t, t predicts token t + 1
    labels: np.ndarray  # [N] the answer tokens
    exact_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [n] rows of N sent dense too
    position_ids: np.ndarray | None = None  # [1, L] packed only: restarting at 0 per row, no mask

    def __post_init__(self) -> None:
        if (self.lengths is None) == (self.position_ids is None):
            raise ValueError("a WeakRequest has either lengths (padded) or position_ids (packed), not both or neither")

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.input_ids, self.lengths, self.position_ids, self.positions, self.labels,
                                      self.exact_rows) if a is not None)

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], n_exact: int = 0) -> "WeakRequest":
        """From a micro-batch as the worker trains on it: padded ``{input_ids, attention_mask,
        labels} [B, T]`` or packed ``{input_ids, position_ids, labels} [1, L]`` (no mask).

        Answer positions are those of ``PairLM.forward``: ``labels[:, 1:] != -100``, row-major.
        ``n_exact`` answer positions, evenly spaced, are also requested dense.
        """
        ids, labels = batch["input_ids"], batch["labels"]
        mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
        if (mask is None) == (position_ids is None):
            raise ValueError("weak pool requests need a padded micro-batch (attention_mask, no position_ids) or a "
                             "packed one (position_ids, no attention_mask); got "
                             f"{'both' if mask is not None else 'neither'}")
        lengths = None
        if mask is not None:
            lengths = mask.sum(1)
            prefix = torch.arange(mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            if not torch.equal(mask.bool(), prefix):
                raise ValueError("weak pool requests need right-padded micro-batches (attention_mask a prefix per row)")
            lengths = lengths.numpy().astype(np.int32)
        else:
            if ids.shape[0] != 1 or position_ids.shape != ids.shape:
                raise ValueError(f"a packed micro-batch is input_ids and position_ids [1, L]; got "
                                 f"{tuple(ids.shape)} and {tuple(position_ids.shape)}")
            _check_packed_positions(position_ids)
            position_ids = position_ids.numpy().astype(np.int32)
        pos = answer_positions(labels)  # [N], the rows PairLM.forward scores, in its order
        n = pos.numel()
        exact = np.unique(np.linspace(0, n - 1, min(n_exact, n)).round().astype(np.int32)) if n else np.zeros(0, np.int32)
        return cls(input_ids=ids.numpy().astype(np.int32), lengths=lengths, positions=pos.numpy().astype(np.int32),
                   labels=labels.reshape(-1)[pos + 1].numpy().astype(np.int32), exact_rows=exact.astype(np.int32),
                   position_ids=position_ids)


@dataclass
class WeakReply:
    """The weak side of a request's answer positions (see the module table)."""

    checkpoint_id: str
    vocab: int
    top_k: int
    topk_logp: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    label_logp: np.ndarray | None = None
    tail_logmass: np.ndarray | None = None
    dense_logp: np.ndarray | None = None
    exact_logp: np.ndarray | None = None

    @property
    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.topk_logp, self.topk_ids, self.label_logp, self.tail_logmass, self.dense_logp,
                            self.exact_logp) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def n_positions(self) -> int:
        return (self.dense_logp if self.top_k == 0 else self.label_logp).shape[0]

    def to_weak(self, device: torch.device | str = "cpu") -> WeakLogProbs:
        """The reply as :class:`~wmss_ray.losses.weak_side.WeakLogProbs` tensors (ids int64)."""
        if self.top_k == 0:
            return WeakLogProbs(self.vocab, dense=torch.from_numpy(self.dense_logp).to(device))
        return WeakLogProbs(self.vocab, topk_logp=torch.from_numpy(self.topk_logp).to(device),
                            topk_ids=torch.from_numpy(self.topk_ids).to(device, torch.int64),
                            label_logp=torch.from_numpy(self.label_logp).to(device),
                            tail_logmass=torch.from_numpy(self.tail_logmass).to(device))

    def exact(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Dense weak log-probs ``[n, V]`` of the request's ``exact_rows`` (None when none)."""
        return None if self.exact_logp is None else torch.from_numpy(self.exact_logp).to(device)
