"""EntropyScorer without Ray: equals a naive per-position loop; padding and batching never
change a score; the logits_to_keep shortcut equals full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wmss_ray.data.chat_tokens import IGNORE_INDEX, end_of_turn_ids, tokenize_example
from wmss_ray.data.corpus import iter_corpus, open_corpus
from wmss_ray.stages.scorer import SCORE_COLUMNS, EntropyScorer

N = 12  # rows used here: enough for several padded batches


@pytest.fixture(scope="module")
def rows(tiny_world):
    cfg = tiny_world.cfg
    out = []
    for rec in iter_corpus(open_corpus(tiny_world.corpus, cfg.data), cfg.data):
        t = tokenize_example(tiny_world.tok, rec["prompt_messages"], rec["answer"], cfg.data.max_seq_len)
        out.append({"sample_id": rec["sample_id"], **t})
        if len(out) == N:
            return out
    return out


@pytest.fixture(scope="module")
def scorer(tiny_world):
    return EntropyScorer(tiny_world.weak, tiny_world.strong, chunk_size=7)


def _naive_entropy(model, ids: list[int], labels: list[int], skip: frozenset = frozenset()) -> tuple[float, int]:
    """Mean over answer positions of -sum p log p, one position at a time, float64; positions
    predicting a token in ``skip`` (end-of-turn) are not answer content."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # [T, V]
    hs = []
    for t in range(len(ids) - 1):
        if labels[t + 1] != IGNORE_INDEX and labels[t + 1] not in skip:  # position t predicts token t+1
            p = torch.softmax(logits[t], -1)
            hs.append(float(-(p * torch.log(p)).sum()))
    return float(np.mean(hs)), len(hs)


def test_scores_equal_naive_loop(scorer, rows, tiny_world):
    got = scorer.score_rows([r["input_ids"] for r in rows[:4]], [r["labels"] for r in rows[:4]])
    eot = end_of_turn_ids(tiny_world.tok)
    assert eot == {tiny_world.tok.convert_tokens_to_ids("<|im_end|>")}
    for i, r in enumerate(rows[:4]):
        hw, n = _naive_entropy(scorer.weak, r["input_ids"], r["labels"], eot)
        hs, _ = _naive_entropy(scorer.strong, r["input_ids"], r["labels"], eot)
        assert got["h_weak"][i] == pytest.approx(hw, abs=1e-5)
        assert got["h_strong"][i] == pytest.approx(hs, abs=1e-5)
        assert got["dh"][i] == pytest.approx(hs - hw, abs=1e-5)
        # the supervised <|im_end|> is trained on but not scored
        assert got["n_answer_tokens"][i] == n == sum(1 for x in r["labels"] if x != IGNORE_INDEX) - 1
    assert got["h_weak"].std() > 1e-3  # scores differ by far more than the 1e-5 tolerance


@pytest.mark.parametrize("batch", [2, 5, N])
def test_padding_and_batch_size_do_not_change_scores(scorer, rows, batch):
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    one = [scorer.score_rows([i], [lab]) for i, lab in zip(ids, labels)]
    scorer.max_rows = batch
    try:
        many = scorer.score_rows(ids, labels)
    finally:
        scorer.max_rows = None
    assert len({len(i) for i in ids}) > 1  # rows of different lengths: real padding happened
    for key in ("h_weak", "h_strong", "dh"):
        np.testing.assert_allclose(many[key], [o[key][0] for o in one], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(many["n_answer_tokens"], [o["n_answer_tokens"][0] for o in one])


def test_logits_budget_splits_forwards_without_changing_scores(scorer, rows, monkeypatch):
    """``scoring.logits_mb`` sizes the forwards: a budget of one row's logits makes one forward per
    row per model, with the same scores as one forward of the whole batch."""
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    whole = scorer.score_rows(ids, labels)
    calls = []
    real = EntropyScorer.model_entropy
    monkeypatch.setattr(EntropyScorer, "model_entropy", lambda self, m, b: calls.append(len(b["input_ids"])) or real(self, m, b))
    width, vocab = max(map(len, ids)), scorer.weak.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(scorer, "logits_mb", width * vocab * 4 / 2**20)  # exactly one fp32 row
    split = scorer.score_rows(ids, labels)
    assert calls == [1] * (2 * len(rows))  # weak and strong, one row each
    for key in ("h_weak", "h_strong", "dh"):
        np.testing.assert_allclose(split[key], whole[key], atol=1e-5, rtol=0)


def test_logits_to_keep_equals_full_logits(scorer, rows, monkeypatch):
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    fast = scorer.score_rows(ids, labels)
    monkeypatch.setattr(EntropyScorer, "_takes_logits_to_keep", staticmethod(lambda m: False))
    full = scorer.score_rows(ids, labels)
    np.testing.assert_allclose(fast["h_weak"], full["h_weak"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(fast["h_strong"], full["h_strong"], atol=1e-6, rtol=0)


def test_call_is_a_ray_data_udf(scorer, rows):
    batch = {"sample_id": np.array([r["sample_id"] for r in rows[:3]], dtype=object),
             "input_ids": np.array([np.array(r["input_ids"], np.int32) for r in rows[:3]], dtype=object),
             "labels": np.array([np.array(r["labels"], np.int32) for r in rows[:3]], dtype=object)}
    out = scorer(batch)
    assert tuple(out) == SCORE_COLUMNS
    assert list(out["sample_id"]) == [r["sample_id"] for r in rows[:3]]
    assert out["h_weak"].dtype == np.float64 and out["n_answer_tokens"].dtype == np.int64


def test_same_model_is_loaded_once(tiny_world, rows):
    s = EntropyScorer(tiny_world.weak, tiny_world.weak)
    assert s.strong is s.weak
    out = s.score_rows([rows[0]["input_ids"]], [rows[0]["labels"]])
    assert out["dh"][0] == 0.0
