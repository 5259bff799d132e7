"""models/varlen.py: packed rows' boundaries computed on the host, handed to varlen kernels only,
and (through a pure-torch reference kernel) reaching every layer of a tiny model, whose packed
logits then equal each row's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models import varlen_reference as ref
from wmss_ray.config.schema import DemoModelConfig
from wmss_ray.models.varlen import (
    attention_kwargs,
    boundaries_from_lengths,
    boundaries_from_position_ids,
    takes_varlen_kwargs,
)
from wmss_ray.training.packing import pack_rows


def _model(arch="qwen3", attn="sdpa"):
    from wmss_ray.models.tiny import build_tiny_model
    from wmss_ray.models.tokenizer import build_demo_tokenizer

    mc = DemoModelConfig(arch=arch, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64)
    model = build_tiny_model(mc, build_demo_tokenizer(), seed=3).float().eval()
    model.config._attn_implementation = attn
    return model


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(5, 40, n).tolist(), "labels": rng.integers(5, 40, n).tolist()}
            for n in lengths]


def test_boundaries_from_lengths_and_from_position_ids_agree_with_pack_rows():
    rows = _rows([3, 5, 1, 4])
    b = pack_rows(rows)
    assert b["cu_seq_lens"].dtype == torch.int32 and b["cu_seq_lens"].tolist() == [0, 3, 8, 9, 13]
    assert type(b["max_length"]) is int and b["max_length"] == 5
    cu, mx = boundaries_from_position_ids(b["position_ids"].numpy().astype(np.int32))  # as the pool gets them
    assert torch.equal(cu, b["cu_seq_lens"]) and mx == 5
    cu, mx = boundaries_from_lengths([7])
    assert cu.tolist() == [0, 7] and mx == 7
    with pytest.raises(ValueError, match="positive lengths"):
        boundaries_from_lengths([3, 0])
    with pytest.raises(ValueError, match="start at 0"):
        boundaries_from_position_ids(np.array([[1, 2, 0]]))


def test_only_varlen_kernels_get_the_boundaries():
    cu, mx = boundaries_from_lengths([2, 3])
    for impl in ("sdpa", "eager", "flex_attention"):  # the mask path: rows kept apart by a mask
        m = _model(attn=impl)
        assert not takes_varlen_kwargs(m) and attention_kwargs(m, cu, mx) == {}
    for impl in ("flash_attention_2", "flash_attention_3", ref.NAME):
        m = _model(attn=impl)
        assert takes_varlen_kwargs(m)
        assert attention_kwargs(m, cu, mx) == {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                                               "max_length_q": 3, "max_length_k": 3}
        assert attention_kwargs(m, None, None) == {}  # a padded batch: nothing to pass
        with pytest.raises(ValueError, match="max_length"):
            attention_kwargs(m, cu, None)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_boundaries_reach_every_layer_of_a_varlen_kernel_and_keep_rows_apart(arch):
    """The reference kernel (which asserts it got cu_seq_lens and never derives them) runs in
    every layer, and the packed logits equal each row's own (sdpa, unpacked)."""
    sdpa = _model(arch, "sdpa")
    varlen = _model(arch, "sdpa")
    ref.use_on(varlen)
    rows = _rows([7, 12, 4, 9], seed=1)
    b = pack_rows(rows)
    ref.CALLS.clear()
    with torch.no_grad():
        packed = varlen.model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                              **attention_kwargs(varlen, b["cu_seq_lens"], b["max_length"])).last_hidden_state[0]
        assert ref.CALLS == [0, 1, 2]  # once per layer, each with the boundaries
        start = 0
        for r in rows:
            alone = sdpa.model(input_ids=torch.tensor([r["input_ids"]])).last_hidden_state[0]
            n = len(r["input_ids"])
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        # transformers does not hand a custom kernel the boundaries itself: without them it fails
        with pytest.raises(AssertionError, match="no cu_seq_lens"):
            varlen.model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
