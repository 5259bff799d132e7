"""Chat-template tokenisation with answer-only labels, truncation policy, padding.

Contract (docs/ARCHITECTURE.md): a tokenised row is ``{"input_ids": list[int], "labels":
list[int]}`` of equal length with ``labels[t] = -100`` on every prompt/template token and
``labels[t] = input_ids[t]`` on the answer tokens, which include the end-of-turn text the chat
template appends after the assistant content (e.g. ``"<|im_end|>\\n"``). Labels are unshifted,
as HF causal LMs take them: logits at position ``t`` predict token ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from wmss_ray.core.constants import IGNORE_INDEX  # re-exported here; defined once in core


class BadRowError(ValueError):
    """A row that cannot be tokenised under the current policy.

    ``reason`` is a short machine-readable code ("too_long", "empty_answer_after_truncation",
    "empty_prompt", "no_chat_template") for counting skipped rows by cause.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _ids(encoded: Any) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5 by default."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    return list(encoded)


def prompt_ids(tokenizer, prompt_messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of the chat-template prompt, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRowError("no_chat_template", f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    return _ids(
        tokenizer.apply_chat_template(
            list(prompt_messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def answer_text(tokenizer, prompt_messages: Sequence[Mapping[str, str]], answer: str) -> str:
    """The text the template appends for the assistant turn (content + end-of-turn).

    Rendered as full-conversation minus prompt-with-generation-prompt; templates for which the
    full rendering does not extend the prompt (e.g. ones that rewrite earlier turns) fall back
    to ``answer + eos_token``.
    """
    msgs = list(prompt_messages)
    prompt_text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": answer}], tokenize=False
    )
    if full.startswith(prompt_text) and len(full) > len(prompt_text):
        return full[len(prompt_text):]
    return answer + (tokenizer.eos_token or "")


def tokenize_example(
    tokenizer,
    prompt_messages: Sequence[Mapping[str, str]],
    answer: str,
    max_seq_len: int,
    truncation: str = "left",
) -> dict[str, list[int]]:
    """Tokenise one (prompt messages, answer) pair; supervise the answer tokens only.

    Args:
        prompt_messages: the conversation before the answer, ``[{"role", "content"}, ...]``.
        answer: the assistant's reply (the last assistant message).
        max_seq_len: the row's maximum length in tokens.
        truncation: "left" cuts prompt tokens from the left, keeping the answer whole (an
            answer longer than ``max_seq_len`` loses its tail); "reject" refuses long rows.

    Returns:
        ``{"input_ids": list[int] [T], "labels": list[int] [T]}`` with ``T <= max_seq_len``.

    Raises:
        BadRowError: reason "too_long" (truncation="reject"), "empty_answer_after_truncation"
            (nothing of the answer fits), "empty_prompt" or "no_chat_template".
    """
    if truncation not in ("left", "reject"):
        raise ValueError(f"truncation must be 'left' or 'reject', got {truncation!r}")
    if not prompt_messages:
        raise BadRowError("empty_prompt", "the row has no prompt messages")
    p_ids = prompt_ids(tokenizer, prompt_messages)
    a_ids = _ids(tokenizer(answer_text(tokenizer, prompt_messages, answer), add_special_tokens=False)["input_ids"])
    if not a_ids:
        raise BadRowError("empty_answer_after_truncation", "the answer renders to no tokens")
    total = len(p_ids) + len(a_ids)
    if total > max_seq_len:
        if truncation == "reject":
            raise BadRowError("too_long", f"{total} tokens > max_seq_len {max_seq_len}")
        keep_prompt = max(0, max_seq_len - len(a_ids))
        # Left truncation keeps the end of the prompt: the generation prompt and the question's
        # last tokens are what the answer is conditioned on.
        p_ids = p_ids[len(p_ids) - keep_prompt:] if keep_prompt else []
        a_ids = a_ids[: max_seq_len - len(p_ids)]
        if not a_ids:
            raise BadRowError(
                "empty_answer_after_truncation", f"no answer token fits in max_seq_len {max_seq_len}"
            )
    return {
        "input_ids": p_ids + a_ids,
        "labels": [IGNORE_INDEX] * len(p_ids) + a_ids,
    }


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate(
    rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad tokenised rows into a batch.

    Returns ``input_ids [B, T] int64`` (pad_id on pad), ``attention_mask [B, T] int64`` (1 on
    tokens) and ``labels [B, T] int64`` (-100 on pad); ``T`` is the longest row, rounded up to
    ``pad_to_multiple_of`` when given. Rows without "labels" get -100 everywhere.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    width = _round_up(max(len(r["input_ids"]) for r in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        attention[i, :n] = 1
        if "labels" in r:
            labels[i, :n] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def left_pad_prompts(prompt_id_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation: ``(input_ids [B, T], attention_mask [B, T])``.

    Left padding keeps every prompt's last token at position ``T - 1``, where generation starts.
    """
    if not prompt_id_lists:
        raise ValueError("left_pad_prompts needs at least one prompt")
    width = max(len(p) for p in prompt_id_lists)
    input_ids = torch.full((len(prompt_id_lists), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_id_lists), width), dtype=torch.long)
    for i, p in enumerate(prompt_id_lists):
        if len(p):
            input_ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            attention[i, width - len(p):] = 1
    return input_ids, attention
