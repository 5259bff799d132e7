"""``losses.chunk_ops.rows_per_forward``: the rows of a no-grad forward whose logits fit a budget."""

from __future__ import annotations

import pytest

from wmss_ray.losses.chunk_ops import rows_per_forward


def test_rows_follow_the_logits_budget():
    # V = 151,936, width 256, fp32: one row is 148.4 MiB, so 1 GiB holds 6 rows (the old 2**28 cap)
    assert rows_per_forward(64, 256, 151_936, 1024) == 6
    assert rows_per_forward(64, 256, 151_936, 1024, bytes_per_logit=2) == 13  # bf16: twice the rows
    assert rows_per_forward(4, 256, 151_936, 1024) == 4  # never more than the batch
    assert rows_per_forward(64, 4096, 151_936, 1024) == 1  # one row over budget still runs alone
    assert rows_per_forward(0, 8, 10, 1.0) == 1


@pytest.mark.parametrize("bad", [dict(width=0), dict(vocab=0), dict(logits_mb=0), dict(rows=-1),
                                 dict(bytes_per_logit=0)])
def test_bad_sizes_are_refused(bad):
    args = dict(rows=4, width=8, vocab=10, logits_mb=1.0, bytes_per_logit=4) | bad
    with pytest.raises(ValueError):
        rows_per_forward(**args)
