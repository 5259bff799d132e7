"""Sequence packing: the packed layout, attention that never crosses rows, and per-step losses
equal to the padded path's (SFT, WMSS joint and frozen; ZeRO-0 and ZeRO-3) in one process.
The 2-worker ZeRO-3 run is in ``test_training_ray.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.test_training_units import _run_worker, make_artifacts, tiny_cfg
from wmss_ray.config.schema import DemoModelConfig
from wmss_ray.training.packing import pack_rows, padding_fraction


def _rows(lengths, seed=0, vocab=40):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(5, vocab, n).tolist()
        prompt = int(rng.integers(0, n - 1))  # prompt 0 too: a row whose first token is supervised
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_pack_rows_layout_and_no_label_crosses_rows():
    rows = _rows([3, 5, 2])
    rows[1]["labels"] = list(rows[1]["input_ids"])  # fully supervised row: its first label is dropped
    b = pack_rows(rows)
    assert b["input_ids"].shape == b["position_ids"].shape == b["labels"].shape == (1, 10)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert b["input_ids"][0].tolist() == sum((r["input_ids"] for r in rows), [])
    starts = [0, 3, 8]
    expect = sum((r["labels"] for r in rows), [])
    for s in starts:
        expect[s] = -100
    assert b["labels"][0].tolist() == expect
    # the shifted target of each row's last position is -100: nothing predicts the next row
    targets = b["labels"][0, 1:]
    assert all(targets[s - 1] == -100 for s in starts[1:])
    assert rows[1]["labels"][0] != -100  # the caller's rows are not modified
    with pytest.raises(ValueError, match="row 1"):
        pack_rows([rows[0], {"input_ids": [1, 2], "labels": [1]}])


def test_padding_fraction_against_direct_count():
    lengths = [3, 5, 2, 7, 7, 1, 4]
    mb = 3
    direct = 0
    padded = 0
    for g in range(0, len(lengths), mb):
        grp = lengths[g:g + mb]
        padded += len(grp) * max(grp)
        direct += sum(grp)
    assert padding_fraction(lengths, mb) == pytest.approx(1 - direct / padded)
    assert padding_fraction([4, 4, 4], 2) == 0.0


@pytest.mark.parametrize("arch,attn", [("qwen3", "sdpa"), ("qwen3", "eager"), ("llama", "sdpa")])
def test_packed_rows_give_the_logits_of_each_row_alone(arch, attn):
    """transformers detects the packed format from position_ids and keeps attention in each row."""
    from wmss_ray.models.tiny import build_tiny_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    mc = DemoModelConfig(arch=arch, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64)
    model = build_tiny_model(mc, tok, seed=3).float().eval()
    model.config._attn_implementation = attn
    rows = _rows([7, 12, 4, 9], seed=1, vocab=len(tok))
    b = pack_rows(rows)
    with torch.no_grad():
        # use_cache=False as in training: transformers only looks for packing when there is no cache
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            n = len(r["input_ids"])
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        # and it is not trivially so: without position ids the later rows see the earlier ones
        flat = model(input_ids=b["input_ids"], use_cache=False).logits[0]
        assert (flat[7:19] - packed[7:19]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("packing"), tie=True)


@pytest.mark.parametrize("phase,mode,stage", [("sft", "sft", 0), ("wmss", "joint", 0), ("wmss", "joint", 3),
                                              ("wmss", "frozen", 3)])
def test_packed_steps_equal_padded_steps(artifacts, tmp_path, phase, mode, stage):
    """Same rows per step, so per-step losses and gradient norms equal the padded run's (fp32,
    within 1e-5), with the mix and at ZeRO-3, and so do the strong weights after three steps."""
    kw = dict(zero_stage=stage, max_steps=3, micro_batch_size=4)
    padded_w, padded = _run_worker(artifacts, tiny_cfg(**kw), phase, mode, 3, tmp_path / "pad")
    packed_w, packed = _run_worker(artifacts, tiny_cfg(packing=True, **kw), phase, mode, 3, tmp_path / "pack")
    mb = packed_w.micro_batches(0)[0]
    assert mb["input_ids"].shape[0] == 1 and "attention_mask" not in mb  # really packed
    assert padded_w.micro_batches(0)[0]["input_ids"].shape[0] == 4
    for key in ("loss", "ce_strong", "grad_norm", "n_tokens"):
        a, b = [m[key] for m in padded], [m[key] for m in packed]
        assert np.allclose(a, b, rtol=1e-5, atol=1e-7), (key, a, b)
    assert padded[0]["loss"] != padded[1]["loss"]
    sd_pad, sd_pack = padded_w.strong_state_dict(), packed_w.strong_state_dict()  # gathered at ZeRO-3
    for k in sd_pad:  # 1e-4: float reordering, amplified by Adam where gradients are ~0 (see assert_same_weights)
        assert (sd_pad[k] - sd_pack[k]).abs().max() <= 1e-4, k


@pytest.mark.parametrize("phase,mode,stage", [("sft", "sft", 0), ("wmss", "joint", 0), ("wmss", "frozen", 3)])
def test_packed_steps_on_a_varlen_kernel_equal_padded_steps(artifacts, tmp_path, phase, mode, stage):
    """The real PhaseWorker -> engine -> PairLM path hands pack_rows' boundaries to a varlen
    kernel (the pure-torch reference: it asserts it got cu_seq_lens and never derives them) in
    every layer of the strong and the weak model, and the per-step losses equal the padded sdpa
    run's."""
    from tests.models import varlen_reference as ref

    steps, grad_accum = 3, 2
    kw = dict(zero_stage=stage, max_steps=steps, micro_batch_size=4, grad_accum=grad_accum)
    _, padded = _run_worker(artifacts, tiny_cfg(**kw), phase, mode, steps, tmp_path / "pad")
    ref.CALLS.clear()
    worker, packed = _run_worker(artifacts, tiny_cfg(packing=True, **kw), phase, mode, steps, tmp_path / "pack",
                                 before_steps=lambda w: ref.use_on(w.pair.strong, w.pair.weak))
    layers = worker.pair.strong.config.num_hidden_layers
    forwards = steps * grad_accum * (1 if phase == "sft" else 2)  # strong (+ weak) per micro-batch
    assert ref.CALLS == list(range(layers)) * forwards
    for key in ("loss", "ce_strong", "grad_norm", "n_tokens"):
        a, b = [m[key] for m in padded], [m[key] for m in packed]
        assert np.allclose(a, b, rtol=1e-5, atol=1e-7), (key, a, b)
