"""Chat-template tokenisation with honest answer labels, truncation policy, padding.

Contract (docs/ARCHITECTURE.md): a tokenised row is ``{"input_ids": list[int], "labels":
list[int], "truncated": bool}`` with ``labels[t] = -100`` on every token the model did not write
and ``labels[t] = input_ids[t]`` on the supervised ones. Labels are unshifted, as HF causal LMs
take them: logits at position ``t`` predict token ``t + 1``.

The assistant turn the chat template renders is split in three (``assistant_turn_parts``):

- filler: template text before the answer that the model did not write, e.g. the empty
  ``<think>\n\n</think>\n\n`` block Qwen3-style templates put before a plain answer. It joins
  the prompt side (conditioning, never supervised), and generation prompts end with it too;
- content: the answer as the template renders it (supervised);
- end: the end-of-turn text (e.g. ``<|im_end|>\n``). ``data.supervise: answer_and_eos`` supervises
  it up to and including its first end-of-turn token (the one that teaches stopping; the ``\n``
  after it is filler); ``answer_only`` supervises none of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from wmss_ray.losses.constants import IGNORE_INDEX  # re-exported here; defined once in core


class BadRowError(ValueError):
    """A row that cannot be tokenised under the current policy.

    ``reason`` is a short machine-readable code ("too_long", "prompt_truncated_away",
    "empty_answer_after_truncation", "empty_prompt", "no_chat_template") for counting skipped
    rows by cause.
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


_SENTINEL = "WMSSANSWERSENTINEL"  # plain word: survives templates that strip or trim content
SUPERVISE = ("answer_and_eos", "answer_only")


def _render(tokenizer, msgs: list, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)


def assistant_turn_parts(tokenizer, prompt_messages: Sequence[Mapping[str, str]], answer: str) -> tuple[str, str, str]:
    """``(filler, content, end)``: the text the template appends for the assistant turn.

    Rendered as full-conversation minus prompt-with-generation-prompt. The template's own text
    around an answer is found by rendering a sentinel answer: what precedes it is filler when the
    real turn starts with exactly that text (an answer that carries its own ``<think>`` reasoning
    changes it, and then the model wrote all of it), what follows it is the end of the turn.
    Templates whose full rendering does not extend the prompt (e.g. ones that rewrite earlier
    turns) fall back to ``("", answer, eos_token)``.
    """
    return _rendered_turn(tokenizer, prompt_messages, answer)[1:]


def _rendered_turn(tokenizer, prompt_messages: Sequence[Mapping[str, str]], answer: str) -> tuple[str, str, str, str]:
    """``(prompt text with generation prompt, filler, content, end)``; see assistant_turn_parts."""
    msgs = list(prompt_messages)
    prompt_text = _render(tokenizer, msgs, True)
    full = _render(tokenizer, msgs + [{"role": "assistant", "content": answer}], False)
    if not (full.startswith(prompt_text) and len(full) > len(prompt_text)):
        return prompt_text, "", answer, tokenizer.eos_token or ""
    turn = full[len(prompt_text):]
    probe = _render(tokenizer, msgs + [{"role": "assistant", "content": _SENTINEL}], False)
    if probe.startswith(prompt_text) and probe.count(_SENTINEL) == 1:
        filler, end = probe[len(prompt_text):].split(_SENTINEL)
        if turn.endswith(end):
            body = turn[: len(turn) - len(end)]
            if filler and body.startswith(filler):
                return prompt_text, filler, body[len(filler):], end
            return prompt_text, "", body, end
    return prompt_text, "", turn, ""


def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """Token ids that end an assistant turn: the eos token and the special tokens of the
    template's end-of-turn text (``<|im_end|>`` even where ``eos_token`` is ``<|endoftext|>``, as
    in base-model tokenizers). Generation stops on them; entropy scoring skips them."""
    cached = getattr(tokenizer, "_wmss_end_of_turn_ids", None)
    if cached is not None:  # computed once per tokenizer object (tokenize_example calls this per row)
        return cached
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if getattr(tokenizer, "chat_template", None):
        _, _, end = assistant_turn_parts(tokenizer, [{"role": "user", "content": "hi"}], _SENTINEL)
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        ids |= {t for t in _ids(tokenizer(end, add_special_tokens=False)["input_ids"]) if t in special}
    try:
        tokenizer._wmss_end_of_turn_ids = frozenset(ids)
    except AttributeError:  # a tokenizer that refuses new attributes: recompute next time
        pass
    return frozenset(ids)


def generation_prompt_ids(tokenizer, prompt_messages: Sequence[Mapping[str, str]], answer: str | None = None) -> list[int]:
    """Prompt ids a model generates from: the chat prompt + the template's filler (the same
    conditioning the answer had in training; ``answer`` decides whether the filler applies)."""
    filler, _, _ = assistant_turn_parts(tokenizer, prompt_messages, answer if answer is not None else _SENTINEL)
    ids = prompt_ids(tokenizer, prompt_messages)
    return ids + (_ids(tokenizer(filler, add_special_tokens=False)["input_ids"]) if filler else [])


def _template_tail_len(tokenizer, prompt_messages: Sequence[Mapping[str, str]], n_prompt: int) -> int:
    """Tokens at the end of a prompt of ``n_prompt`` tokens that hold no conversation text: the
    last message's closing (e.g. ``<|im_end|>\n``), the generation prompt and the filler."""
    msgs = [dict(m) for m in prompt_messages]
    context = len(_ids(tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True,
                                                    return_dict=False)))
    probe = _render(tokenizer, msgs[:-1] + [{**msgs[-1], "content": _SENTINEL}], False)
    closing = probe.split(_SENTINEL)[-1] if probe.count(_SENTINEL) == 1 else ""
    n_closing = len(_ids(tokenizer(closing, add_special_tokens=False)["input_ids"])) if closing else 0
    return max(0, n_prompt - context) + n_closing


def tokenize_example(
    tokenizer,
    prompt_messages: Sequence[Mapping[str, str]],
    answer: str,
    max_seq_len: int,
    truncation: str = "left",
    supervise: str = "answer_and_eos",
) -> dict[str, Any]:
    """Tokenise one (prompt messages, answer) pair; supervise what the model writes only.

    Args:
        prompt_messages: the conversation before the answer, ``[{"role", "content"}, ...]``.
        answer: the assistant's reply (the last assistant message).
        max_seq_len: the row's maximum length in tokens.
        truncation: "left" cuts prompt tokens from the left, keeping the answer whole; "reject"
            refuses long rows.
        supervise: "answer_and_eos" (content + end-of-turn token) or "answer_only".

    Returns:
        ``{"input_ids": list[int] [T], "labels": list[int] [T], "truncated": bool}`` with
        ``T <= max_seq_len``; ``truncated`` when prompt tokens were cut.

    Raises:
        BadRowError: reason "too_long" (truncation="reject"), "prompt_truncated_away" (left
            truncation would keep nothing of the conversation before the generation prompt),
            "empty_answer_after_truncation" (the answer renders to no tokens), "empty_prompt"
            or "no_chat_template".
    """
    if truncation not in ("left", "reject"):
        raise ValueError(f"truncation must be 'left' or 'reject', got {truncation!r}")
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, got {supervise!r}")
    if not prompt_messages:
        raise BadRowError("empty_prompt", "the row has no prompt messages")
    if not getattr(tokenizer, "chat_template", None):
        raise BadRowError("no_chat_template", f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    prompt_text, filler, content, end = _rendered_turn(tokenizer, prompt_messages, answer)
    encode = lambda text: _ids(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []  # noqa: E731
    # == prompt_ids(): apply_chat_template(tokenize=True) tokenises the rendering the same way
    p_ids = encode(prompt_text) + encode(filler)
    c_ids, e_ids = encode(content), encode(end)
    if not c_ids:
        raise BadRowError("empty_answer_after_truncation", "the answer renders to no tokens")
    stop = next((i for i, t in enumerate(e_ids) if t in end_of_turn_ids(tokenizer)), None)
    n_sup_end = 0 if supervise == "answer_only" else (len(e_ids) if stop is None else stop + 1)
    # The end text after the stop token (e.g. "\n") is never supervised: drop it before cutting prompt.
    tail = e_ids[n_sup_end:] if supervise == "answer_and_eos" else e_ids
    if len(p_ids) + len(c_ids) + len(e_ids) > max_seq_len:
        e_ids = e_ids[: len(e_ids) - len(tail)]
        tail = []
    total = len(p_ids) + len(c_ids) + len(e_ids)
    truncated = total > max_seq_len
    if truncated:
        if truncation == "reject":
            raise BadRowError("too_long", f"{total} tokens > max_seq_len {max_seq_len}")
        keep_prompt = max_seq_len - len(c_ids) - len(e_ids)
        if keep_prompt <= _template_tail_len(tokenizer, prompt_messages, len(p_ids)):
            raise BadRowError("prompt_truncated_away",
                              f"the answer ({len(c_ids) + len(e_ids)} tokens) leaves no room for the prompt "
                              f"({len(p_ids)} tokens) in max_seq_len {max_seq_len}")
        # Left truncation keeps the end of the prompt: the generation prompt and the question's
        # last tokens are what the answer is conditioned on.
        p_ids = p_ids[len(p_ids) - keep_prompt:]
    a_ids = c_ids + e_ids
    sup = c_ids + e_ids[:n_sup_end] if supervise == "answer_and_eos" else c_ids
    return {
        "input_ids": p_ids + a_ids,
        "labels": [IGNORE_INDEX] * len(p_ids) + sup + [IGNORE_INDEX] * (len(a_ids) - len(sup)),
        "truncated": bool(truncated),
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
