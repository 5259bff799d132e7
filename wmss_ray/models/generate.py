"""Batched greedy generation from chat prompts (left-padded), for evaluation and checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from wmss_ray.data.tokenize import left_pad_prompts, prompt_ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """Generation stops: the model's generation_config eos ids plus the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts_messages: Sequence[Sequence[Mapping[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions (special tokens stripped), one per prompt conversation.

    Each prompt is rendered with the chat template and the generation prompt, batches are
    left-padded (``[B, T]``) so that generation starts at the same position for every row.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts_messages), batch_size):
            chunk = [prompt_ids(tokenizer, m) for m in prompts_messages[start:start + batch_size]]
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
