"""The HF engine's settings and sampling: what both engines share (Sampling, stops, cutting)."""

from __future__ import annotations

import pytest
import torch

from wmss_ray.config.schema import DemoModelConfig
from wmss_ray.data.chat_tokens import prompt_ids
from wmss_ray.models.generate import Sampling, cut_at_stop, decode, hf_generate_ids, stop_token_ids
from wmss_ray.models.tiny import build_tiny_model
from wmss_ray.models.tokenizer import build_demo_tokenizer


@pytest.fixture(scope="module")
def model_and_tok():
    tok = build_demo_tokenizer()
    model = build_tiny_model(DemoModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1,
                                             num_kv_heads=1, max_position_embeddings=128), tok, seed=0)
    with torch.no_grad():  # large random weights: completions that differ from prompt to prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    prompts = [prompt_ids(tok, [{"role": "user", "content": f"What is {i} + {2 * i}?"}]) for i in range(6)]
    return model, tok, prompts


def test_sampling_settings_are_checked():
    assert Sampling().greedy
    with pytest.raises(ValueError, match="temperature > 0"):
        Sampling(n=2)
    with pytest.raises(ValueError):
        Sampling(temperature=0.7, top_p=0.0)
    with pytest.raises(ValueError):
        Sampling(max_new_tokens=0)


def test_cut_at_stop_keeps_the_first_stop_and_nothing_after():
    assert cut_at_stop([5, 6, 2, 7, 2], [2, 9]) == [5, 6, 2]
    assert cut_at_stop([5, 6], [2]) == [5, 6]
    assert cut_at_stop([], [2]) == []


def test_stops_are_the_generation_eos_plus_the_end_of_turn(model_and_tok):
    model, tok, _ = model_and_tok
    stops = stop_token_ids(model.generation_config, tok)
    assert stops[:len(model.generation_config.eos_token_id)] == list(model.generation_config.eos_token_id)
    assert tok.eos_token_id in stops and len(stops) == len(set(stops))


def test_hf_sampling_gives_n_per_prompt_and_reproduces_by_seed(model_and_tok):
    model, tok, prompts = model_and_tok
    s = Sampling(max_new_tokens=8, n=3, temperature=1.0, top_p=0.9, seed=3)
    a = hf_generate_ids(model, tok, prompts, s, batch_size=4)
    b = hf_generate_ids(model, tok, prompts, s, batch_size=4)
    other = hf_generate_ids(model, tok, prompts, Sampling(max_new_tokens=8, n=3, temperature=1.0, top_p=0.9, seed=4),
                            batch_size=4)
    assert [len(x) for x in a] == [3] * len(prompts)
    assert a == b and a != other
    state = torch.random.get_rng_state()
    hf_generate_ids(model, tok, prompts[:1], s)
    assert torch.equal(state, torch.random.get_rng_state()), "sampling leaves the caller's RNG alone"


def test_greedy_ids_decode_to_the_old_text(model_and_tok):
    """The ids path decodes to what decoding HF generate's whole padded tail gave before."""
    model, tok, prompts = model_and_tok
    ids = hf_generate_ids(model, tok, prompts, Sampling(max_new_tokens=8), batch_size=8)
    stops = stop_token_ids(model.generation_config, tok)
    from wmss_ray.data.chat_tokens import left_pad_prompts

    batch, mask = left_pad_prompts(prompts, tok.pad_token_id)
    gen = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         eos_token_id=stops, pad_token_id=tok.pad_token_id)
    assert decode(tok, [c[0] for c in ids]) == tok.batch_decode(gen[:, batch.shape[1]:], skip_special_tokens=True)
