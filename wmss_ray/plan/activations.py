"""What a forward keeps on the GPU, per model, for ``wmss plan`` (:mod:`wmss_ray.plan.memory`
adds them up): the activations autograd saves for backward (per layer, as real HF layers save
them; tests/test_plan_activations.py measures them) and, under ``training.autocast``, the bf16 copies of
the fp32 weights."""

from __future__ import annotations

from wmss_ray.plan.shapes import ModelShape

#: Bytes per ``[head, query, key]`` element of eager attention, per layer, in bf16, fp32 and
#: autocast alike, as measured (tests/test_plan_activations.py): kept for backward (the fp32 softmax
#: output and the probabilities the value product keeps), and about what a frozen forward adds at
#: once (the scores, the fp32 softmax, the probabilities cast back: 7.7-8.8 measured, within the
#: frozen transient's margin). Counted before as two tensors in the weights' dtype: half in bf16.
EAGER_SCORE_BYTES = 8


def autocast_cast_bytes(shape: ModelShape, trained: bool, checkpointing: bool) -> float:
    """``training.autocast``: the bf16 copies of one model's fp32 weights its forward makes (no
    cast cache, ``training.pair``). Autograd keeps each trained linear layer's copy until its
    backward: all of them (2 bytes per decoder parameter), or with checkpointing one decoder layer's
    (recomputed in backward); the loss keeps the head's (2 V D). The embedding lookup casts
    nothing. A frozen model at stage 3 (fp32) casts one layer at a time."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    layer = 2.0 * (shape.params - embeddings) / shape.layers  # one decoder layer (the embedding is not cast)
    if not trained:
        return layer
    return (layer if checkpointing else 2.0 * (shape.params - embeddings)) + 2.0 * shape.vocab * shape.hidden


def rms_norm_saved_bytes(width: int, input_bytes: int, rows: int = 1) -> float:
    """Bytes an HF RMSNorm keeps for backward per token: the fp32 copy of its input (the input
    itself when it is fp32), the normalised values in the input's dtype, a fp32 scale per row."""
    return 4 * width + input_bytes * width + 4 * rows


def layer_saved_bytes(s: ModelShape, act_bytes: int, autocast: bool = False) -> float:
    """Bytes one trained decoder layer keeps for backward, per token (a Llama/Qwen-style HF layer,
    flash/sdpa attention), as autograd's saved tensors of a real layer count them
    (tests/test_plan_activations.py measures them). ``act_bytes``: the weights' bytes (2 bf16, 4 fp32);
    ``autocast`` (``training.autocast``): fp32 weights, bf16 compute, fp32 residual stream.

    - each RMSNorm over width ``w`` (rows per token ``r``): the fp32 copy of its input (``4w``; the
      input itself when fp32), the normalised values in its input's dtype and a fp32 scale per row;
      the residual stream's two per layer (``w = h``), with q/k norms also ``h_q`` and ``d_kv``
      (``r`` = heads, kv heads), whose inputs are the projections';
    - the linear layers' inputs: q/k/v share one, gate/up one (``2h``); under autocast each of the
      five casts its own bf16 copy;
    - attention: rotated q, k and v and the output (``2 h_q + 2 d_kv``) and a fp32 log-sum-exp per head;
    - SwiGLU: gate, up, silu(gate) and their product (``4I``).

    ``h``: hidden size, ``h_q``: heads x head_dim, ``d_kv``: kv heads x head_dim, ``I``: intermediate.
    In bf16 that is ``16h + 10h_q + 10d_kv + 8I`` bytes (+ the per-row scales), under autocast
    ``26h + 10h_q + 10d_kv + 8I``: the fp32 residual doubles the norms' share, and the casts add ``10h``.
    """
    h, hq, dkv, inter = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    compute = 2 if autocast else act_bytes  # the matmuls' operands and outputs
    residual = 4 if autocast else act_bytes  # the residual stream (fp32 weights' embeddings and norms)

    saved = 2 * rms_norm_saved_bytes(h, residual)
    if s.qk_norm:
        saved += rms_norm_saved_bytes(hq, compute, s.heads) + rms_norm_saved_bytes(dkv, compute, s.kv_heads)
    saved += (5 * 2 * h) if autocast else 2 * act_bytes * h
    saved += compute * (2 * hq + 2 * dkv) + 4 * s.heads
    return saved + compute * 4 * inter


def activation_bytes(s: ModelShape, tokens: int, seq_len: int, micro_batch: int, act_bytes: int, *,
                     checkpointing: bool, eager: bool, trained: bool = True, autocast: bool = False) -> float:
    """Activations one model keeps for backward (or, frozen, the transient of one layer).

    - trained, no checkpointing: ``layers x`` :func:`layer_saved_bytes` ``x tokens``, plus the
      final norm's;
    - trained, checkpointing: each layer's input (``h`` values per token per layer, in the residual
      stream's dtype: fp32 under ``autocast``), plus one layer recomputed in backward;
    - frozen weak model (no grad): one layer's transient, about ``e = 4 h + 2 h_q + 2 d_kv + 4 I
      (+ h_q + d_kv with q/k norms)`` values per token: the norms' inputs and outputs, q, k, v,
      the attention output, SwiGLU's four ``I``-wide tensors.

    Eager attention also keeps ``[heads, s, s]`` tensors per row, :data:`EAGER_SCORE_BYTES` per
    element, per layer (a frozen model: one layer's). The frozen transient is an upper bound:
    measured on CPU, a real forward's peak is 0.60-0.68x of it under sdpa, 0.67-0.83x under eager
    (tests/test_plan_activations.py).
    """
    scores = EAGER_SCORE_BYTES * s.heads * seq_len**2 * micro_batch if eager else 0
    if not trained:
        e = 4 * s.hidden + 2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + 4 * s.intermediate
        if s.qk_norm:
            e += (s.heads + s.kv_heads) * s.head_dim
        return e * tokens * act_bytes + scores
    per_layer = layer_saved_bytes(s, act_bytes, autocast) * tokens
    residual = 4 if autocast else act_bytes
    final_norm = rms_norm_saved_bytes(s.hidden, residual) * tokens
    if checkpointing:
        return s.layers * s.hidden * tokens * residual + per_layer + scores + final_norm
    return s.layers * (per_layer + scores) + final_norm
