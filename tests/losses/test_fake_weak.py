"""The controls' fake weak sides (``losses.fake_weak``): each distribution is what it claims
(uniform; the real weak entropy to 1e-4 nats), and the chunked loss with each equals a naive
reference built densely from the definition, in value and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wmss_ray.losses.fake_weak import (
    MAX_SPIKE_MASS,
    entropy_matched_weak,
    row_entropy,
    spike_entropy,
    spike_ids,
    spike_mass_for_entropy,
    uniform_weak,
)
from wmss_ray.losses.mixing import sparse_mixed_ce
from wmss_ray.losses.reference import mixed_ce_naive
from wmss_ray.losses.weak_side import dense_weak_logp

N, D, V, LAM = 40, 16, 97, 0.6


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(7)
    h_s = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    h_w = 2.0 * torch.randn(N, D, generator=g, dtype=torch.float64)  # a range of entropies
    w_w = torch.randn(V, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    return h_s, w_s, h_w, w_w, y


def _loss_and_grads(fn, h_s, w_s):
    loss = fn(h_s, w_s)
    gh, gw = torch.autograd.grad(loss, (h_s, w_s))
    return loss.detach(), gh, gw


def _assert_same(a, b, tol=1e-9):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def test_spike_mass_hits_every_entropy_from_0_to_log_v():
    target = torch.linspace(1e-3, math.log(V), 200, dtype=torch.float64)
    p = spike_mass_for_entropy(target, V)
    assert torch.all((p >= 1.0 / V) & (p <= MAX_SPIKE_MASS))
    assert float((spike_entropy(p, V) - target).abs().max()) < 1e-10
    assert torch.allclose(spike_mass_for_entropy(torch.tensor([9.0, 0.0], dtype=torch.float64), V),
                          torch.tensor([1.0 / V, MAX_SPIKE_MASS], dtype=torch.float64), atol=1e-12)


def test_entropy_matched_has_the_real_weak_entropy_and_random_spikes(tensors):
    _, _, h_w, w_w, y = tensors
    weak = entropy_matched_weak(h_w, w_w, y, seed_key=(0, 3, 1), chunk_rows=7)
    logq = dense_weak_logp(weak, y).double()  # [N, V], the distribution the loss sees
    assert torch.allclose(logq.exp().sum(-1), torch.ones(N, dtype=torch.float64), atol=1e-5)
    real = -(torch.softmax(h_w @ w_w.t(), -1) * torch.log_softmax(h_w @ w_w.t(), -1)).sum(-1)
    fake = -(logq.exp() * logq).sum(-1)
    assert float((fake - real).abs().max()) < 1e-4  # the tolerance (fp32 on the wire)
    assert torch.allclose(row_entropy(h_w, w_w, chunk_rows=7), real, atol=1e-5)
    # the spike is the mode, and it is not the weak model's nor tied to the labels
    spikes = logq.argmax(-1)
    assert torch.equal(spikes, spike_ids((0, 3, 1), N, V))
    assert (spikes == (h_w @ w_w.t()).argmax(-1)).float().mean() < 0.2
    assert torch.equal(entropy_matched_weak(h_w, w_w, (y + 1) % V, (0, 3, 1), 7).topk_ids[:, 0], spikes)


def test_spike_ids_are_fixed_by_their_key():
    a = spike_ids((1, 2, 3), 500, V)
    assert torch.equal(a, spike_ids((1, 2, 3), 500, V)) and not torch.equal(a, spike_ids((1, 2, 4), 500, V))
    assert a.min() >= 0 and a.max() < V and len(set(a.tolist())) > V // 2  # spread over the vocabulary


def test_uniform_loss_equals_naive_and_is_sft_at_temperature_1_over_lambda(tensors):
    h_s, w_s, _, _, y = tensors
    chunked = _loss_and_grads(lambda h, w: sparse_mixed_ce(h, w, uniform_weak(y, V), y, LAM, chunk_size=16), h_s, w_s)
    naive = _loss_and_grads(lambda h, w: mixed_ce_naive(h @ w.t(), torch.full((N, V), -math.log(V),
                                                        dtype=torch.float64), y, LAM), h_s, w_s)
    tempered = _loss_and_grads(lambda h, w: F.cross_entropy(LAM * (h @ w.t()), y), h_s, w_s)
    _assert_same(chunked, naive, tol=1e-6)  # the weak log-probs travel in fp32
    _assert_same(chunked, tempered, tol=1e-6)


def test_entropy_matched_loss_equals_naive_dense_definition(tensors):
    h_s, w_s, h_w, w_w, y = tensors
    weak = entropy_matched_weak(h_w, w_w, y, seed_key=(5, 0, 0), chunk_rows=16)
    # the definition, densely: p on the spike, (1 - p) / (V - 1) on every other token
    p = spike_mass_for_entropy(row_entropy(h_w, w_w, 16), V)
    q = ((1 - p) / (V - 1)).unsqueeze(1).repeat(1, V)
    q.scatter_(1, spike_ids((5, 0, 0), N, V).unsqueeze(1), p.unsqueeze(1))
    # the wire is fp32: compare at its precision
    chunked = _loss_and_grads(lambda h, w: sparse_mixed_ce(h, w, weak, y, LAM, chunk_size=16), h_s, w_s)
    naive = _loss_and_grads(lambda h, w: mixed_ce_naive(h @ w.t(), torch.log(q), y, LAM), h_s, w_s)
    _assert_same(chunked, naive, tol=1e-6)
