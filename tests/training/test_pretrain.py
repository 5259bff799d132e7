"""Phase 0: a few steps of pre-training write a loadable M0 and its metrics."""

from __future__ import annotations

import json

import torch

from wmss_ray.config.loading import config_from_dict
from wmss_ray.models.loading import load_causal_lm, load_tokenizer
from wmss_ray.models.tokenizer import build_demo_tokenizer
from wmss_ray.training.pretrain import _usable_cpus, pack_texts, pretrain_base

TINY = [
    "models.demo_model.hidden_size=32", "models.demo_model.intermediate_size=64",
    "models.demo_model.num_layers=1", "models.demo_model.num_heads=2", "models.demo_model.num_kv_heads=1",
    "data.demo.n_pretrain=40", "phase0.steps=3", "phase0.batch_size=2", "phase0.seq_len=32", "phase0.log_every=1",
    "phase0.num_threads=1",  # a 2-core CI box is busy with other tests; 1 thread is faster there
]


def test_pretrain_base_writes_loadable_m0(tmp_path):
    cfg = config_from_dict({}, TINY)
    threads = torch.get_num_threads()
    out = pretrain_base(cfg, tmp_path / "m0")
    assert torch.get_num_threads() == threads  # the thread setting is given back
    assert _usable_cpus() >= 1
    metrics = json.loads((tmp_path / "m0" / "phase0_metrics.json").read_text())
    assert metrics["steps"] == 3 and [s for s, _ in metrics["losses"]] == [0, 1, 2]
    assert all(l > 0 for _, l in metrics["losses"]) and metrics["seconds"] > 0
    model, tok = load_causal_lm(out), load_tokenizer(out)
    assert model.config.vocab_size == len(tok) and tok.eos_token == "<|im_end|>"
    assert model.config.hidden_size == 32
    # seeded: the same config gives the same weights
    again = load_causal_lm(pretrain_base(cfg, tmp_path / "m0b"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_pack_texts_separates_with_endoftext():
    tok = build_demo_tokenizer()
    stream, starts = pack_texts(tok, ["1+1=2", "Q: x"])
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.decode(stream.tolist()) == "<|endoftext|>1+1=2<|endoftext|>Q: x<|endoftext|>"
    assert (stream == eot).sum() == 3
    assert starts.tolist() == [0, 6] and (stream[starts] == eot).all()


def test_phase0_with_every_cpu_is_bit_identical_run_to_run(tmp_path):
    """``phase0.num_threads: 0`` (the default: every usable CPU) — same seed, same machine, same
    thread count: two runs give the same weights bit for bit."""
    cfg = config_from_dict({}, [*TINY[:-1], "phase0.num_threads=0"])
    a = load_causal_lm(pretrain_base(cfg, tmp_path / "a")).state_dict()
    b = load_causal_lm(pretrain_base(cfg, tmp_path / "b")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "phase0_metrics.json").read_text()) for d in ("a", "b"))
    assert ma["losses"] == mb["losses"] and ma["threads"] == mb["threads"] == _usable_cpus()
