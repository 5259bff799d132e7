"""Batched greedy generation from chat prompts (left-padded), for evaluation and checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from wmss_ray.data.chat_tokens import end_of_turn_ids, left_pad_prompts, prompt_ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """Generation stops: the model's generation_config eos ids plus the tokenizer's end-of-turn
    ids (its eos and the chat template's end-of-turn token, e.g. ``<|im_end|>`` for a base-model
    tokenizer whose eos is ``<|endoftext|>``)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    ids += sorted(t for t in end_of_turn_ids(tokenizer) if t not in ids)
    return ids


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts_messages: Sequence[Sequence[Mapping[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    prompt_id_lists: Sequence[Sequence[int]] | None = None,
) -> list[str]:
    """Greedy completions (special tokens stripped), one per prompt conversation.

    Each prompt is rendered with the chat template and the generation prompt (or given as token
    ids in ``prompt_id_lists``, e.g. ``data.tokenize.generation_prompt_ids`` with the template's
    filler), batches are left-padded (``[B, T]``) so generation starts at the same position.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts_messages), batch_size):
            chunk = ([list(p) for p in prompt_id_lists[start:start + batch_size]] if prompt_id_lists is not None
                     else [prompt_ids(tokenizer, m) for m in prompts_messages[start:start + batch_size]])
            ids, mask = left_pad_prompts(chunk, pad_id)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_token_ids(model, tokenizer),
                pad_token_id=pad_id,
            )
            out.extend(tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
