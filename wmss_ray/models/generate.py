"""Generation settings and the transformers (HF) engine: batched, left-padded, greedy or sampled.

Both engines (this one and :mod:`wmss_ray.models.vllm_engine`) take the same prompt token ids and
the same :class:`Sampling`, stop at the same tokens (:func:`stop_token_ids`) and return token ids
cut after the first stop token (:func:`cut_at_stop`); :func:`decode` turns them into text the same
way for both, so two engines that pick the same tokens give the same strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from wmss_ray.data.chat_tokens import end_of_turn_ids, left_pad_prompts, prompt_ids


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn.

    ``n`` completions per prompt; ``temperature`` 0 is greedy (then ``n`` must be 1);
    ``top_p`` nucleus mass (1.0: off). No top-k and no repetition penalty on either engine (the
    model's ``generation_config`` defaults for those are ignored, so both engines sample from the
    same distribution). ``seed``: sampling is reproducible on the same machine for the same seed;
    prompt ``i`` of a call draws from ``seed + i`` on the vLLM engine, the HF engine seeds each
    batch with ``seed + first prompt index``.
    """

    max_new_tokens: int = 64
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling settings {self}")
        if self.greedy and self.n != 1:
            raise ValueError(f"{self.n} completions per prompt need temperature > 0 (greedy gives one)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Generation stops: the model's ``generation_config`` eos ids plus the tokenizer's end-of-turn
    ids (its eos and the chat template's end-of-turn token, e.g. ``<|im_end|>`` for a base-model
    tokenizer whose eos is ``<|endoftext|>``)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    ids += sorted(t for t in end_of_turn_ids(tokenizer) if t not in ids)
    return ids


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """``ids`` up to and including the first stop token (all of them when none stops)."""
    stop_set = set(stops)
    for i, t in enumerate(ids):
        if t in stop_set:
            return list(ids[:i + 1])
    return list(ids)


def decode(tokenizer, completions: Sequence[Sequence[int]]) -> list[str]:
    """Completion token ids -> text, special tokens (the stop token) removed."""
    return tokenizer.batch_decode([list(c) for c in completions], skip_special_tokens=True)


@torch.no_grad()
def hf_generate_ids(
    model,
    tokenizer,
    prompt_id_lists: Sequence[Sequence[int]],
    sampling: Sampling,
    batch_size: int = 64,
) -> list[list[list[int]]]:
    """Completions as token ids, ``[prompt][sample]`` (``sampling.n`` per prompt), each cut after
    its first stop token.

    Batches of ``batch_size`` prompts are left-padded (``[B, T]``) so generation starts at the same
    position; the batch is the unit of padding, so greedy outputs are those of the same batches.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    stops = stop_token_ids(model.generation_config, tokenizer)
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    try:
        for start in range(0, len(prompt_id_lists), batch_size):
            ids, mask = left_pad_prompts([list(p) for p in prompt_id_lists[start:start + batch_size]], pad_id)
            kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id)
            if sampling.greedy:
                kwargs.update(do_sample=False)
            else:  # no top-k: the same distribution vLLM samples from (its top_k=-1)
                kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                              num_return_sequences=sampling.n)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(sampling.seed + start)
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = gen[:, ids.shape[1]:].tolist()  # [B * n, new], samples of a prompt adjacent
            for p in range(ids.shape[0]):
                out.append([cut_at_stop(new[p * sampling.n + s], stops) for s in range(sampling.n)])
    finally:
        model.train(was_training)
    return out


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
    ids in ``prompt_id_lists``, e.g. ``data.chat_tokens.generation_prompt_ids`` with the
    template's filler).
    """
    if prompt_id_lists is None:
        prompt_id_lists = [prompt_ids(tokenizer, m) for m in prompts_messages]
    ids = hf_generate_ids(model, tokenizer, prompt_id_lists, Sampling(max_new_tokens=max_new_tokens), batch_size)
    return decode(tokenizer, [c[0] for c in ids])
