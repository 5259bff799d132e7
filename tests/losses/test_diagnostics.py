"""Diagnostics against direct computation (softmax, autograd) and against the chunked stats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wmss_ray.losses.diagnostics import (
    SUMMARY_KEYS,
    batch_diagnostics,
    nontarget_grad_mass,
    summarize_stats,
    target_probs,
)
from wmss_ray.losses.mixing import chunked_mixed_ce
from wmss_ray.losses.reference import mix_logits, mixed_ce_naive

IGN = -100


def make_logits(n=23, v=31, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    zw = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = IGN
    return zs, zw, y


def test_target_probs_direct():
    zs, zw, y = make_logits()
    valid = y != IGN
    p_mix, p_strong = target_probs(zs, zw, y, 0.4)
    rows = torch.arange(len(y))[valid]
    torch.testing.assert_close(p_mix, torch.softmax(0.4 * zs + 0.6 * zw, -1)[rows, y[valid]])
    torch.testing.assert_close(p_strong, torch.softmax(zs, -1)[rows, y[valid]])


@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0])
def test_nontarget_grad_mass_equals_autograd(lam):
    """Sum over k != y of |d loss_n / d z_strong[n, k]|, averaged over tokens, from autograd."""
    zs, zw, y = make_logits()
    valid = y != IGN
    n = int(valid.sum())

    def nontarget(loss_fn):
        z = zs.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(z) * n, z)  # per-token (not averaged) gradients
        grad = grad[valid].abs()
        grad[torch.arange(n), y[valid]] = 0.0
        return grad.sum(1).mean().item()

    mixed = nontarget(lambda z: mixed_ce_naive(z, zw, y, lam))
    plain = nontarget(lambda z: F.cross_entropy(z, y, ignore_index=IGN))
    got = nontarget_grad_mass(zs, zw, y, lam)
    assert got["mixed"] == pytest.approx(mixed, rel=1e-10)
    assert got["plain"] == pytest.approx(plain, rel=1e-10)
    assert got["amplification"] == pytest.approx(mixed / plain, rel=1e-10)


def test_uncertain_weak_amplifies_the_gradient_of_a_confident_strong():
    v = 10
    y = torch.arange(4)
    zs = torch.full((4, v), -5.0)
    zs[torch.arange(4), y] = 5.0  # P_strong(y) ~ 1: plain CE's gradient has vanished
    zw = torch.zeros(4, v)  # the weak model is uniform
    out = nontarget_grad_mass(zs, zw, y, 0.5)
    assert out["amplification"] > 10


def test_batch_diagnostics_direct_and_chunked_stats_agree():
    g = torch.Generator().manual_seed(3)
    n, d, v, lam = 29, 8, 40, 0.42
    hs, ws = (torch.randn(rows, d, generator=g, dtype=torch.float64) for rows in (n, v))
    hw, ww = (torch.randn(rows, d + 3, generator=g, dtype=torch.float64) for rows in (n, v))  # D_w != D_s
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = IGN
    zs, zw = hs @ ws.T, hw @ ww.T
    diag = batch_diagnostics(zs, zw, y, lam)
    assert tuple(diag) == SUMMARY_KEYS and all(isinstance(x, float) for x in diag.values())

    valid = y != IGN
    p_mix, p_strong = target_probs(zs, zw, y, lam)
    mass = nontarget_grad_mass(zs, zw, y, lam)
    direct = {
        "n_tokens": float(valid.sum()),
        "ce_mix": F.cross_entropy(mix_logits(zs, zw, lam), y, ignore_index=IGN).item(),
        "ce_strong": F.cross_entropy(zs, y, ignore_index=IGN).item(),
        "p_mix_y": p_mix.mean().item(),
        "p_strong_y": p_strong.mean().item(),
        "nontarget_grad_mix": mass["mixed"],
        "nontarget_grad_strong": mass["plain"],
        "amplification": mass["amplification"],
    }
    for k in SUMMARY_KEYS:
        assert diag[k] == pytest.approx(direct[k], rel=1e-10), k

    # Stats summed over two micro-batches of the chunked loss give the same summary.
    sums = None
    for rows in (slice(0, 11), slice(11, n)):
        _, st = chunked_mixed_ce(hs[rows], ws, hw[rows], ww, y[rows], lam, chunk_size=4, return_stats=True)
        sums = st if sums is None else sums.add_(st)
    from_stats = summarize_stats(sums)
    for k in SUMMARY_KEYS:
        assert from_stats[k] == pytest.approx(diag[k], rel=1e-10), k


def test_no_answer_tokens():
    zs, zw, y = make_logits()
    y = torch.full_like(y, IGN)
    diag = batch_diagnostics(zs, zw, y, 0.5)
    assert diag["n_tokens"] == 0.0 and diag["ce_mix"] == 0.0 and math.isnan(diag["amplification"])
    assert nontarget_grad_mass(zs, zw, y, 0.5)["mixed"] == 0.0
