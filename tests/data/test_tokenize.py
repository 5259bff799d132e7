"""Answer-only labels, truncation policies, padding."""

from __future__ import annotations

import pytest
import torch

from wmss_ray.data.tokenize import IGNORE_INDEX, BadRowError, collate, left_pad_prompts, tokenize_example
from wmss_ray.models.tokenizer import build_demo_tokenizer

TOK = build_demo_tokenizer()
PROMPT = [{"role": "user", "content": "Compute (23 + 45) * 3 - 17."}]
ANSWER = "23+45=68\n68*3=204\n204-17=187\n#### 187"


def _prompt_len():
    return len(TOK.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_labels_cover_exactly_the_answer_and_end_of_turn():
    row = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    full = TOK.apply_chat_template(PROMPT + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    assert TOK.decode(ids) == full  # prompt + answer tokens == the full rendering
    n_prompt = _prompt_len()
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert supervised == ids[n_prompt:]
    assert TOK.decode(supervised) == ANSWER + "<|im_end|>\n"
    assert TOK.eos_token_id in supervised


def test_left_truncation_keeps_the_answer():
    row = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=len(ANSWER) + 12)
    assert len(row["input_ids"]) == len(ANSWER) + 12
    assert TOK.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == ANSWER + "<|im_end|>\n"
    # the kept prompt is the prompt's tail, ending with the generation prompt
    assert TOK.decode(row["input_ids"][:10]).endswith("assistant\n")


def test_left_truncation_cuts_answer_tail_when_answer_alone_is_too_long():
    row = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=5)
    assert row["labels"] == row["input_ids"] and TOK.decode(row["input_ids"]) == ANSWER[:5]


def test_reject_policy_and_reasons():
    with pytest.raises(BadRowError) as e:
        tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=20, truncation="reject")
    assert e.value.reason == "too_long" and "max_seq_len 20" in str(e.value)
    ok = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256, truncation="reject")
    assert ok == tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256)
    with pytest.raises(BadRowError) as e:
        tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=0)
    assert e.value.reason == "empty_answer_after_truncation"
    with pytest.raises(BadRowError) as e:
        tokenize_example(TOK, [], ANSWER, max_seq_len=64)
    assert e.value.reason == "empty_prompt"
    assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError):
        tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=64, truncation="right")


def test_collate_right_pads():
    rows = [tokenize_example(TOK, PROMPT, ANSWER, 256), {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    b = collate(rows, pad_id=TOK.pad_token_id)
    n0 = len(rows[0]["input_ids"])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, n0)
    assert b["input_ids"].dtype == torch.int64
    assert b["input_ids"][1].tolist() == [5, 6, 7] + [TOK.pad_token_id] * (n0 - 3)
    assert b["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (n0 - 3)
    assert b["labels"][1].tolist() == [-100, 6, 7] + [IGNORE_INDEX] * (n0 - 3)
    assert b["attention_mask"][0].sum() == n0
    b8 = collate(rows, pad_id=0, pad_to_multiple_of=8)
    assert b8["input_ids"].shape[1] % 8 == 0 and b8["input_ids"].shape[1] >= n0


def test_left_pad_prompts():
    ids, mask = left_pad_prompts([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
