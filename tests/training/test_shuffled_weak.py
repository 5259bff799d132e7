"""``mix.weak_source: shuffled`` (``training/shuffled_weak.py``): the partner map is a seeded
derangement inside length buckets, the logits line up as documented, and the loss through
``PairLM`` equals the naive mixed CE of the strong logits with the partners' weak logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.weak_pool.rows import RowsById
from wmss_ray.losses.constants import IGNORE_INDEX
from wmss_ray.training.shuffled_weak import partner_batch, shuffle_partners


def test_partners_are_a_seeded_derangement_within_length_buckets():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1001)
    p = shuffle_partners(lengths, seed=3, bucket_rows=8)
    assert np.all(p != np.arange(len(p)))  # never itself
    assert sorted(p.tolist()) == list(range(len(p)))  # each row a partner once
    assert np.array_equal(p, shuffle_partners(lengths, seed=3, bucket_rows=8))
    assert not np.array_equal(p, shuffle_partners(lengths, seed=4, bucket_rows=8))
    # same bucket: a partner's length rank is within one bucket (+ the merged lone row) of the row's
    rank = np.empty(len(p), np.int64)
    rank[np.argsort(lengths, kind="stable")] = np.arange(len(p))
    assert np.abs(rank[p] - rank).max() <= 2 * 8
    assert np.median(np.abs(lengths[p] - lengths)) <= 5  # much closer than two random rows (~160)
    with pytest.raises(ValueError, match=">= 2 rows"):
        shuffle_partners(np.array([5]), seed=0, bucket_rows=8)


def test_partner_positions_line_up_in_order_and_wrap():
    def row(n_prompt, n_answer):
        return {"input_ids": np.arange(n_prompt + n_answer), "labels": np.r_[[IGNORE_INDEX] * n_prompt,
                                                                            np.arange(n_answer)]}

    main = [row(3, 4), row(2, 2)]  # 4 and 2 answer labels; position t predicts t+1: 4 and 2 positions
    partners = [row(1, 3), row(5, 5)]  # 3 and 5 answer positions (the first label is the row's first token)
    b = partner_batch(main, partners, pad_id=0)
    assert b["answer_pos"].numel() == 3 + 5
    # row 0: its 4 positions take the partner's 0, 1, 2, then 0 again (wrap); row 1: partner 1's first 2
    assert b["weak_index"].tolist() == [0, 1, 2, 0, 3, 4]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from tests.training.test_training_units import make_artifacts

    return make_artifacts(tmp_path_factory.mktemp("shuffled"))


def test_shuffled_loss_equals_naive_mix_with_the_partners_weak_logits(art):
    from wmss_ray.losses.positions import answer_positions
    from wmss_ray.losses.reference import mixed_ce_naive
    from wmss_ray.models.loading import load_causal_lm
    from wmss_ray.training.pair import PairLM

    pair = PairLM(load_causal_lm(art["strong"], dtype="float32"), load_causal_lm(art["weak"], dtype="float32"),
                  "frozen", 0.5, chunk_size=5, weak_source="shuffled")
    rows = RowsById(art["tokenized"])
    main_ids, partner_ids = ["s0000", "s0001", "s0002"], ["s0005", "s0003", "s0004"]
    main = rows.batch(main_ids, pad_id=0)
    raw = lambda ids: rows.reader.rows([rows.row_of[i] for i in ids])  # noqa: E731
    wb = partner_batch(raw(main_ids), raw(partner_ids), pad_id=0)
    loss, _ = pair(main["input_ids"], main["attention_mask"], main["labels"], num_tokens=25.0, weak_batch=wb)
    ours = torch.autograd.grad(loss, list(pair.strong.parameters()))
    # naive: strong logits at the main answer positions, weak logits of each partner row at its
    # k-th (wrapped) answer position, written out row by row
    pos = answer_positions(main["labels"])
    y = main["labels"].reshape(-1)[pos + 1]
    z_s = pair.strong(input_ids=main["input_ids"], attention_mask=main["attention_mask"]).logits
    z_s = z_s.reshape(-1, z_s.shape[-1])[pos]
    z_w = []
    with torch.no_grad():
        for m, p in zip(raw(main_ids), raw(partner_ids)):
            logits = pair.weak(input_ids=torch.as_tensor(np.asarray(p["input_ids"], np.int64))[None]).logits[0]
            p_pos = np.flatnonzero(np.asarray(p["labels"])[1:] != IGNORE_INDEX)
            n = int((np.asarray(m["labels"])[1:] != IGNORE_INDEX).sum())
            z_w.append(logits[p_pos[np.arange(n) % len(p_pos)]])
    ref = mixed_ce_naive(z_s, torch.cat(z_w), y, 0.5, num_tokens=25.0)
    theirs = torch.autograd.grad(ref, list(pair.strong.parameters()))
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
