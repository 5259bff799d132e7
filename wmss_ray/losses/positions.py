"""Which positions of a batch the loss scores: the one definition shared by the training step
(``training.pair``, ``training.worker``) and the weak pool's requests (``weak_pool.wire``)."""

from __future__ import annotations

import torch

from wmss_ray.losses.constants import IGNORE_INDEX


def answer_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Flat positions ``b * T + t`` ``[N]`` int64, row-major, of every position ``t`` whose next
    token is supervised (``labels[b, t + 1] != ignore_index``) in unshifted labels ``[B, T]``.

    Position ``p`` predicts ``labels.reshape(-1)[p + 1]``. Computed on the host from a collated
    CPU batch it costs the device nothing; on a device tensor it is one device-to-host sync
    (``nonzero``: its output size depends on the values).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got {tuple(labels.shape)}")
    b, t = (labels[:, 1:] != ignore_index).nonzero(as_tuple=True)
    return b * labels.shape[1] + t
