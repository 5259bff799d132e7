"""``LossStats``: micro-batches combine field by field (sums add, maxima max), and pack/unpack
(the one place the fields become tensors for the all-reduce) is an exact round trip."""

from __future__ import annotations

import torch

from wmss_ray.losses.stats import LossStats


def _sample(errors, nbytes, wait):
    s = LossStats.zeros()
    e = torch.tensor(errors, dtype=torch.float64)
    s.add_sampled_rows(e, 2 * e)
    s.add_pool_reply(nbytes, wait)
    s.add_mixed_rows(torch.tensor([0.5, 1.0]), 0.5)
    s.n_tokens.add_(2)
    return s


def test_add_sums_and_maxima_by_field():
    a = _sample([0.1, 0.3], 10, 0.5).add_(_sample([0.2], 5, 0.25))
    f = a.floats()
    assert f["n_sampled"] == 3 and f["n_tokens"] == 4 and f["pool_reply_bytes"] == 15
    assert abs(f["sampled_error_sum"] - 0.6) < 1e-12
    assert f["sampled_error_max"] == 0.3  # a maximum over micro-batches
    assert f["pool_wait_s"] == 0.75  # added over a rank's micro-batches (max over ranks only)
    assert f["ce_mix_sum"] == 2 * (0.5 + 1.0)


def test_pack_unpack_round_trip_and_reduction_kinds():
    s = _sample([0.1, 0.3], 10, 0.5)
    to_sum, to_max = s.pack()
    assert to_sum.dtype == to_max.dtype == torch.float64
    assert to_max.numel() == 3  # tail_mass_max, sampled_error_max, pool_wait_s: max-reduced over ranks
    assert to_sum.numel() + to_max.numel() == len(LossStats._fields)
    assert LossStats.unpack(to_sum, to_max).floats() == s.floats()
