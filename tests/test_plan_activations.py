"""``wmss plan``'s activation terms (``wmss_ray.plan.activations``): the formula, and what real HF
models keep on the CPU, measured in a fresh interpreter: the tensors autograd saves in a trained
forward (sdpa and eager, bf16, fp32 and autocast, checkpointing on and off) and the peak of a
frozen model's no-grad forward. ``benchmarks/plan_activations.py`` prints the measured tables."""

from __future__ import annotations

import json

import pytest

from wmss_ray.plan import ModelShape, activation_bytes, layer_saved_bytes


def test_activation_formula_and_checkpointing():
    s = ModelShape("qwen3-4b", 4_022_468_096, 388_956_160, 2560, 36, 32, 8, 128, 9728, 151936, True)
    h, hq, dkv, inter = 2560, 4096, 1024, 9728
    # bytes per token per layer, bf16: norms 12h (+ scales), q/k norms 6 (h_q + d_kv), the linears'
    # inputs 4h, attention 4 (h_q + d_kv) + its log-sum-exp, SwiGLU 8I
    layer = 16 * h + 10 * hq + 10 * dkv + 8 * inter + 4 * (2 + 32 + 8) + 4 * 32
    assert layer_saved_bytes(s, 2) == layer
    # autocast: fp32 residual stream (its norms 16h) and five bf16 casts of the linears' inputs (10h)
    assert layer_saved_bytes(s, 4, autocast=True) == layer + 4 * h + 6 * h
    final = (4 + 2) * h + 4  # the final norm's
    tokens = 2 * 4096
    plain = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=False, eager=False)
    ckpt = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=True, eager=False)
    assert plain == (36 * layer + final) * tokens
    assert ckpt == (36 * 2 * h + layer + final) * tokens and ckpt < plain / 10
    autocast = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=True, eager=False, autocast=True)
    assert autocast == (36 * 4 * h + layer_saved_bytes(s, 4, autocast=True) + 8 * h + 4) * tokens
    e = 4 * h + 2 * hq + 2 * dkv + 4 * inter + (hq + dkv)  # a frozen model's one-layer transient, values
    frozen = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=False, eager=False, trained=False)
    assert frozen == e * tokens * 2
    eager = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=False, eager=True)
    assert eager == plain + 36 * 32 * 4096**2 * 2 * 8  # 8 bytes per [head, query, key] element per layer
    frozen_eager = activation_bytes(s, tokens, 4096, 2, 2, checkpointing=False, eager=True, trained=False)
    assert frozen_eager == frozen + 32 * 4096**2 * 2 * 8  # one layer's


#: The measured models' config (Qwen3 and Llama alike) and row length.
TINY_KW = dict(vocab_size=256, hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=48, max_position_embeddings=512)
SEQ = 64

#: Runs in a fresh interpreter: per token (one forward over 2 rows minus one over 1 row: the
#: weights, autocast's weight copies and the rotary tables are not per token) autograd's saved
#: tensors of real HF models for every (arch, precision, checkpointing) under sdpa and without
#: checkpointing under eager, and a frozen model's no-grad peak (bf16, fp32; sdpa, eager); prints
#: them as JSON.
_MEASURE = r"""
import itertools, json, torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

KW = {**__TINY_KW__, "attn_implementation": "sdpa"}
SEQ = __SEQ__

def frozen_peak(model, batch):
    # the most a no-grad forward holds at once, besides the weights (MemTracker: every live storage)
    from torch.distributed._tools.mem_tracker import MemTracker
    ids = torch.randint(0, 256, (batch, SEQ), generator=torch.Generator().manual_seed(0))
    tracker = MemTracker()
    tracker.track_external(model)
    with torch.no_grad(), tracker:
        model.model(input_ids=ids)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak["Total"] - sum(v for k, v in peak.items() if getattr(k, "name", "") == "PARAM")

def saved(model, batch, autocast):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}
    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    ids = torch.randint(0, 256, (batch, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.model(input_ids=ids)
    return sum(seen.values())

out = {}
for arch, precision, ckpt in itertools.product(["qwen3", "llama"], ["bf16", "fp32", "autocast"], [False, True]):
    cls, mcls = (Qwen3Config, Qwen3ForCausalLM) if arch == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    model = mcls(cls(**KW)).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    auto = precision == "autocast"
    out[f"{arch} {precision} {ckpt}"] = (saved(model, 2, auto) - saved(model, 1, auto)) / SEQ
for arch, precision, attn in itertools.product(["qwen3", "llama"], ["bf16", "fp32", "autocast"], ["sdpa", "eager"]):
    auto = precision == "autocast"
    if auto and attn == "sdpa":  # measured above (trained); a frozen model is never fp32 + autocast
        continue
    cls, mcls = (Qwen3Config, Qwen3ForCausalLM) if arch == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = mcls(cls(**{**KW, "attn_implementation": attn})).to(dtype)
    model.config.use_cache = False
    if attn == "eager":  # trained: what eager attention adds to what autograd saves
        model.train()
        out[f"{arch} {precision} eager"] = (saved(model, 2, auto) - saved(model, 1, auto)) / SEQ
    if not auto:  # a frozen model in its own dtype (under autocast the weak model is bf16)
        model.eval()
        out[f"{arch} {precision} frozen {attn}"] = (frozen_peak(model, 2) - frozen_peak(model, 1)) / SEQ
print(json.dumps(out))
""".replace("__TINY_KW__", repr(TINY_KW)).replace("__SEQ__", str(SEQ))


@pytest.fixture(scope="module")
def saved_per_token():
    """``{"<arch> <precision> <checkpointing>": bytes per token}`` measured in a fresh interpreter.
    Not in this process: DeepSpeed's ZeRO-3 ``zero.Init`` replaces ``torch.nn.functional.linear``
    process-wide (``mem_efficient_linear``, "persists unless manually reset"), and its linear keeps
    other copies under autocast; an earlier test's ZeRO-3 load would change what is measured."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("precision", ["bf16", "fp32", "autocast"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_bytes_are_what_autograd_saves_in_real_decoder_layers(saved_per_token, arch, precision,
                                                                         checkpointing):
    """The trained-model terms of ``activation_bytes`` against the tensors autograd saves in a
    forward of a real HF model (CPU, sdpa), per token. Counted before: the norms' fp32 internals
    and autocast's fp32 residual and per-linear casts were missing (a 4B no-checkpointing plan
    short by a quarter). The recomputed layer of a checkpointed backward is not in a forward: it
    is left out of the comparison."""
    s, seq = _tiny_shape(arch), SEQ
    act_b, autocast = 2 if precision == "bf16" else 4, precision == "autocast"
    formula = activation_bytes(s, seq, seq, 1, act_b, checkpointing=checkpointing, eager=False, autocast=autocast) / seq
    if checkpointing:
        formula -= layer_saved_bytes(s, act_b, autocast)  # the layer a backward recomputes
    measured = saved_per_token[f"{arch} {precision} {checkpointing}"] - 8  # less the int64 input ids
    assert measured == pytest.approx(formula, rel=0.01), (measured, formula)


def _tiny_shape(arch: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from wmss_ray.plan.shapes import shape_from_model

    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if arch == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    with torch.device("meta"):
        return shape_from_model(model_cls(config_cls(**TINY_KW)), arch)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("precision", ["bf16", "fp32", "autocast"])
def test_eager_attention_keeps_what_the_plan_counts(saved_per_token, arch, precision):
    """Eager attention's ``[heads, s, s]`` share of what autograd saves (eager minus sdpa, the rest
    of the layer the same): 8 bytes per element per layer in every precision. Counted before as
    2 x the weights' bytes: half of it in bf16. (sdpa's own per-head log-sum-exp, which eager does
    not keep, is the 1 % the two differ by.)"""
    s, seq = _tiny_shape(arch), SEQ
    act_b, autocast = 2 if precision == "bf16" else 4, precision == "autocast"
    kw = dict(checkpointing=False, autocast=autocast)
    formula = (activation_bytes(s, seq, seq, 1, act_b, eager=True, **kw)
               - activation_bytes(s, seq, seq, 1, act_b, eager=False, **kw)) / seq
    measured = saved_per_token[f"{arch} {precision} eager"] - saved_per_token[f"{arch} {precision} False"]
    assert measured == pytest.approx(formula, rel=0.01), (measured, formula)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_frozen_models_transient_is_an_upper_bound_of_a_real_forwards_peak(saved_per_token, arch, precision,
                                                                             attn):
    """The frozen weak model's one-layer transient against the peak of a real no-grad forward
    (every live storage but the weights, per token): never under it, at most 1.7x (the per-token
    terms assume every tensor of a layer alive at once; sdpa's peak is 0.60-0.68x of them)."""
    s, seq, act_b = _tiny_shape(arch), SEQ, 2 if precision == "bf16" else 4
    formula = activation_bytes(s, seq, seq, 1, act_b, checkpointing=False, eager=attn == "eager", trained=False) / seq
    measured = saved_per_token[f"{arch} {precision} frozen {attn}"]
    assert measured <= formula <= 1.7 * measured, (measured, formula)
