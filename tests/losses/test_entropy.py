"""Per-token and per-sample next-token entropy (DESIGN.md §1.1)."""

from __future__ import annotations

import math

import pytest
import torch

from wmss_ray.losses.entropy import sample_entropy, token_entropy

IGN = -100


def naive_sample_entropy(logits, labels):
    """Loop over rows and positions; position t counts iff labels[b, t + 1] is an answer token."""
    out, counts = [], []
    for b in range(logits.shape[0]):
        hs = []
        for t in range(logits.shape[1] - 1):
            if labels[b, t + 1] != IGN:
                p = torch.softmax(logits[b, t].double(), dim=-1)
                hs.append(-(p * p.log()).sum().item())
        out.append(sum(hs) / len(hs) if hs else 0.0)
        counts.append(len(hs))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(counts)


def make_batch(b=4, t=13, v=29, seed=0):
    """Right-padded batch: prompt (-100), answer tokens, then padding (-100); one prompt-only row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.full((b, t), IGN)
    for row, (prompt, answer) in enumerate([(3, 6), (1, 12), (5, 2), (4, 0)][:b]):
        labels[row, prompt : prompt + answer] = torch.randint(0, v, (answer,), generator=g)
    return logits, labels


def test_token_entropy_matches_definition_and_bounds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 4
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1))
    assert token_entropy(torch.zeros(2, 17)).allclose(torch.full((2,), math.log(17)))
    # -inf logits (zero probability) contribute 0, not NaN; one-hot -> 0 entropy.
    z = torch.tensor([[0.0, float("-inf"), 0.0], [5.0, float("-inf"), float("-inf")]])
    torch.testing.assert_close(token_entropy(z), torch.tensor([math.log(2), 0.0]))
    assert token_entropy(logits.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("chunk", [1, 4, 7, 256])
def test_sample_entropy_matches_naive_loop(chunk):
    logits, labels = make_batch()
    ref, ref_counts = naive_sample_entropy(logits, labels)
    h, counts = sample_entropy(logits, labels, chunk_size=chunk, return_counts=True)
    assert h.dtype == torch.float32 and counts.dtype == torch.int64
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist()
    assert h[3].item() == 0.0 and counts[3].item() == 0  # prompt-only row


def test_position_t_predicts_token_t_plus_1():
    logits, _ = make_batch(b=1)
    labels = torch.full((1, 13), IGN)
    labels[0, 5] = 3  # the only answer token: scored by the logits at position 4
    h = sample_entropy(logits, labels)
    torch.testing.assert_close(h, token_entropy(logits[:, 4]).float())
    labels = torch.full((1, 13), IGN)
    labels[0, 0] = 3  # a label at position 0 is predicted by no position
    assert sample_entropy(logits, labels).item() == 0.0


def test_right_padding_does_not_change_a_row():
    logits, labels = make_batch()
    h = sample_entropy(logits, labels)
    pad = 9
    # Padding logits are garbage (huge, NaN) and padding labels are ignored.
    junk = torch.full((4, pad, logits.shape[-1]), float("nan"))
    padded_labels = torch.cat([labels, torch.full((4, pad), IGN)], 1)
    padded = sample_entropy(torch.cat([logits, junk], 1), padded_labels, chunk_size=5)
    torch.testing.assert_close(padded, h)
    for row in range(4):  # a row scored alone equals its score in the batch
        alone = sample_entropy(logits[row : row + 1], labels[row : row + 1])
        torch.testing.assert_close(alone, h[row : row + 1])


def test_low_precision_logits_and_degenerate_shapes():
    logits, labels = make_batch()
    h32 = sample_entropy(logits, labels)
    hb = sample_entropy(logits.bfloat16(), labels, chunk_size=3)
    assert hb.dtype == torch.float32
    torch.testing.assert_close(hb, h32, rtol=2e-2, atol=2e-2)
    one = sample_entropy(logits[:, :1], labels[:, :1], return_counts=True)  # T=1 predicts nothing
    assert one[0].tolist() == [0.0] * 4 and one[1].tolist() == [0] * 4
    with pytest.raises(ValueError):
        sample_entropy(logits, labels[:, :-1])
