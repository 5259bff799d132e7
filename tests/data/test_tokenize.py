"""Honest labels (answer + end-of-turn, never template filler), truncation policies, padding."""

from __future__ import annotations

import pytest
import torch

from tests.qwen3_style import build_qwen3_style_tokenizer
from wmss_ray.data.chat_tokens import (
    IGNORE_INDEX,
    BadRowError,
    assistant_turn_parts,
    collate,
    end_of_turn_ids,
    generation_prompt_ids,
    left_pad_prompts,
    tokenize_example,
)
from wmss_ray.models.tokenizer import build_demo_tokenizer

TOK = build_demo_tokenizer()
PROMPT = [{"role": "user", "content": "Compute (23 + 45) * 3 - 17."}]
ANSWER = "23+45=68\n68*3=204\n204-17=187\n#### 187"
MATH_PROMPT = [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in all?"}]
MATH_ANSWER = "In May she sold 48/2 = 24 clips.\nIn all: 48 + 24 = 72.\nThe answer is \\boxed{72}."


@pytest.fixture(scope="module")
def qtok():
    texts = [MATH_ANSWER, MATH_PROMPT[0]["content"], ANSWER, "<think>\n\n</think>\n\n"] * 20
    return build_qwen3_style_tokenizer(texts, vocab_size=350)


def _prompt_len(tok=TOK, prompt=PROMPT):
    return len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def _supervised(row):
    return [t for t in row["labels"] if t != IGNORE_INDEX]


def test_labels_cover_exactly_the_answer_and_end_of_turn():
    row = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels) and row["truncated"] is False
    full = TOK.apply_chat_template(PROMPT + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    assert TOK.decode(ids) == full  # prompt + answer tokens == the full rendering
    n_prompt = _prompt_len()
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    # The answer and <|im_end|> (the stop the model must learn) are supervised; the "\n" the
    # template writes after it is not (generation stops before it).
    assert TOK.decode(_supervised(row)) == ANSWER + "<|im_end|>"
    assert labels[-1] == IGNORE_INDEX and TOK.decode(ids[-1:]) == "\n"
    assert _supervised(row)[-1] == TOK.eos_token_id


def test_answer_only_supervises_no_end_of_turn():
    row = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256, supervise="answer_only")
    assert TOK.decode(_supervised(row)) == ANSWER
    assert row["input_ids"] == tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256)["input_ids"]
    with pytest.raises(ValueError, match="supervise"):
        tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256, supervise="everything")


def test_qwen3_style_empty_think_block_is_never_supervised(qtok):
    full = qtok.apply_chat_template(MATH_PROMPT + [{"role": "assistant", "content": MATH_ANSWER}], tokenize=False)
    assert "<think>\n\n</think>\n\n" + MATH_ANSWER in full  # the template does render the filler
    assert assistant_turn_parts(qtok, MATH_PROMPT, MATH_ANSWER) == ("<think>\n\n</think>\n\n", MATH_ANSWER, "<|im_end|>\n")
    row = tokenize_example(qtok, MATH_PROMPT, MATH_ANSWER, max_seq_len=512)
    assert qtok.decode(row["input_ids"]) == full
    im_end = qtok.convert_tokens_to_ids("<|im_end|>")
    assert qtok.decode(_supervised(row)) == MATH_ANSWER + "<|im_end|>"
    assert _supervised(row)[-1] == im_end
    # The filler is part of the conditioning: it ends the prompt side, and generation starts after it.
    gen = generation_prompt_ids(qtok, MATH_PROMPT, MATH_ANSWER)
    assert row["input_ids"][: len(gen)] == gen and qtok.decode(gen).endswith("assistant\n<think>\n\n</think>\n\n")
    assert all(t == IGNORE_INDEX for t in row["labels"][: len(gen)])
    assert row["labels"][len(gen)] != IGNORE_INDEX
    assert generation_prompt_ids(qtok, MATH_PROMPT) == gen  # without an answer: the plain-answer filler
    only = tokenize_example(qtok, MATH_PROMPT, MATH_ANSWER, max_seq_len=512, supervise="answer_only")
    assert qtok.decode(_supervised(only)) == MATH_ANSWER


def test_qwen3_style_reasoning_the_model_wrote_is_supervised(qtok):
    answer = "<think>\nhalf of 48 is 24\n</think>\n\n\\boxed{72}"
    filler, content, end = assistant_turn_parts(qtok, MATH_PROMPT, answer)
    assert filler == "" and content == "<think>\nhalf of 48 is 24\n</think>\n\n\\boxed{72}" and end == "<|im_end|>\n"
    row = tokenize_example(qtok, MATH_PROMPT, answer, max_seq_len=512)
    assert qtok.decode(_supervised(row)) == content + "<|im_end|>"


def test_end_of_turn_is_the_template_stop_even_when_eos_differs(qtok):
    # Base-model tokenizers: eos is <|endoftext|> but turns end with <|im_end|>; both stop.
    assert qtok.eos_token == "<|endoftext|>"
    assert end_of_turn_ids(qtok) == {qtok.eos_token_id, qtok.convert_tokens_to_ids("<|im_end|>")}
    assert end_of_turn_ids(TOK) == {TOK.eos_token_id}


def test_left_truncation_keeps_the_answer():
    row = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=len(ANSWER) + 20)
    # the "\n" after <|im_end|> (unsupervised) goes first, then the prompt's oldest tokens
    assert len(row["input_ids"]) == len(ANSWER) + 20 and row["truncated"] is True
    assert TOK.decode(_supervised(row)) == ANSWER + "<|im_end|>"
    # the kept prompt is the prompt's tail, ending with the generation prompt
    n_kept = len(row["input_ids"]) - len(ANSWER) - 1
    kept = TOK.decode(row["input_ids"][:n_kept])
    assert TOK.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False).endswith(kept)
    assert kept.endswith("17.<|im_end|>\n<|im_start|>assistant\n")


def test_a_row_whose_prompt_would_be_cut_away_is_rejected(qtok):
    n_answer = len(ANSWER) + 1  # + <|im_end|>; the "\n" after it is dropped first
    # "<|im_end|>\n" closing the question + "<|im_start|>assistant\n" (char tokens, 1 per special)
    tail = 2 + 1 + len("assistant\n")
    # Room for the template's own tokens only: nothing of the question would be left.
    for max_len in (5, n_answer, n_answer + tail):
        with pytest.raises(BadRowError) as e:
            tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=max_len)
        assert e.value.reason == "prompt_truncated_away"
    row = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=n_answer + tail + 1)
    assert row["truncated"] and TOK.decode(row["input_ids"]).startswith(".<|im_end|>\n<|im_start|>assistant\n")
    # Qwen3-style: the think filler belongs to the prompt side and does not count as conversation.
    full = tokenize_example(qtok, MATH_PROMPT, MATH_ANSWER, max_seq_len=512)
    n_sup = len(_supervised(full))
    closing = len(qtok("<|im_end|>\n", add_special_tokens=False)["input_ids"])
    filler_and_gen = len(generation_prompt_ids(qtok, MATH_PROMPT)) - len(
        qtok.apply_chat_template(MATH_PROMPT, tokenize=True, return_dict=False))
    with pytest.raises(BadRowError, match="prompt_truncated_away"):
        tokenize_example(qtok, MATH_PROMPT, MATH_ANSWER, max_seq_len=n_sup + filler_and_gen + closing)
    kept = tokenize_example(qtok, MATH_PROMPT, MATH_ANSWER, max_seq_len=n_sup + filler_and_gen + closing + 1)
    assert kept["truncated"] and qtok.decode(kept["input_ids"]).endswith(MATH_ANSWER + "<|im_end|>")


def test_reject_policy_and_reasons():
    with pytest.raises(BadRowError) as e:
        tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=20, truncation="reject")
    assert e.value.reason == "too_long" and "max_seq_len 20" in str(e.value)
    ok = tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256, truncation="reject")
    assert ok == tokenize_example(TOK, PROMPT, ANSWER, max_seq_len=256)
    with pytest.raises(BadRowError) as e:
        tokenize_example(TOK, PROMPT, "", max_seq_len=64)
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
