"""``weak_pool/wire.py``: what a reply costs on the Train worker's device (``wmss plan``'s line)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wmss_ray.weak_pool.wire import WeakReply, device_reply_bytes


@pytest.mark.parametrize("top_k", [0, 4])
def test_a_reply_on_the_device_takes_what_device_reply_bytes_says(top_k):
    n, v, n_exact = 7, 50, 3
    reply = WeakReply("ckpt", v, top_k, exact_logp=np.zeros((n_exact, v), np.float32))
    if top_k:
        reply.topk_logp, reply.topk_ids = np.zeros((n, top_k), np.float32), np.zeros((n, top_k), np.int32)
        reply.label_logp, reply.tail_logmass = np.zeros(n, np.float32), np.zeros(n, np.float32)
    else:
        reply.dense_logp = np.zeros((n, v), np.float32)
    weak = reply.to_weak("cpu")
    tensors = [t for t in (weak.dense, weak.topk_logp, weak.topk_ids, weak.label_logp, weak.tail_logmass)
               if t is not None]
    rows = torch.from_numpy(np.arange(n_exact, dtype=np.int64))  # as WeakFeed.get ships them
    on_device = sum(t.nbytes for t in tensors) + reply.exact("cpu").nbytes + rows.nbytes
    assert on_device == device_reply_bytes(n, top_k, v, n_exact)
    assert device_reply_bytes(n, top_k, v) == sum(t.nbytes for t in tensors)
