"""Fake weak sides for the controls (``mix.weak_source``): is it the weak model, or the mixing?

Each builds the weak side of ``N`` answer rows as :class:`~wmss_ray.losses.weak_side.WeakLogProbs`
in top-k form, so the loss is ``losses.mixing.sparse_mixed_ce`` (the pool's exact path: the tail
of these distributions *is* uniform, so the top-k form loses nothing):

- ``uniform``: ``q_v = 1 / V`` for every token. Softmax is shift-invariant, so the mixed CE is
  the CE of ``λ · z_strong`` alone: training the strong model at temperature ``1 / λ``. No weak
  forward is needed.
- ``entropy_matched``: per row, a distribution with exactly the real weak model's entropy
  ``H`` (nats) and no relation to the tokens: mass ``p`` on one *spike* token drawn uniformly at
  random (seeded, see :func:`spike_ids`), ``(1 - p) / (V - 1)`` on each of the others.
  ``H(p) = -p log p - (1 - p) log((1 - p) / (V - 1))`` falls strictly from ``log V`` at
  ``p = 1 / V`` to 0 at ``p = 1``, so exactly one ``p`` in ``[1/V, 1]`` gives ``H``; it is found
  by bisection in float64 (:func:`spike_mass_for_entropy`, 64 halvings: far below 1e-12 nats).
  ``p`` is capped at ``1 - 1e-6`` so that no token has probability 0 (a zero weak probability
  on the label makes the mixed CE infinite); the entropy then differs from a ``H`` below the
  cap's entropy (2.7e-5 nats at V = 151,936) by less than that.

Every function here is deterministic: the same inputs and seed key give the same distribution
on any device.
"""

from __future__ import annotations

import hashlib

import torch

from wmss_ray.losses.weak_side import WeakLogProbs

#: The controls' weak sides besides the real weak model (``mix.weak_source``).
FAKE_WEAK_SOURCES = ("uniform", "entropy_matched")
#: Largest spike mass: keeps every token's probability above 0 (see the module docstring).
MAX_SPIKE_MASS = 1.0 - 1e-6
_BISECTIONS = 64


def row_entropy(h_weak: torch.Tensor, w_weak: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Entropy in nats of each row's weak distribution ``softmax(h_weak @ w_weak.T)``: ``[N]`` float64.

    ``h_weak [N, D]``, ``w_weak [V, D]``; ``chunk_rows`` rows at a time (``[chunk, V]`` fp32 at
    most), never the whole ``[N, V]``. No gradient.
    """
    out = torch.empty(h_weak.shape[0], dtype=torch.float64, device=h_weak.device)
    with torch.no_grad():
        for s in range(0, h_weak.shape[0], max(1, chunk_rows)):
            logp = torch.log_softmax((h_weak[s:s + chunk_rows] @ w_weak.t()).float(), dim=-1)
            out[s:s + chunk_rows] = -(logp.exp() * logp).sum(-1).double()
    return out


def spike_entropy(p: torch.Tensor, vocab: int) -> torch.Tensor:
    """Entropy (nats, float64) of mass ``p`` on one token and ``(1 - p) / (V - 1)`` on each other."""
    p = p.double()
    rest = (1.0 - p).clamp_min(0.0)
    return -torch.xlogy(p, p) - torch.xlogy(rest, rest / (vocab - 1))


def spike_mass_for_entropy(entropy: torch.Tensor, vocab: int) -> torch.Tensor:
    """The spike mass ``p [N]`` (float64) whose distribution has entropy ``entropy [N]``.

    Bisection on ``[1/V, MAX_SPIKE_MASS]`` (``spike_entropy`` falls strictly there); an entropy at
    or above ``log V`` gives ``1/V`` (uniform), one below the cap's gives the cap.
    """
    if vocab < 2:
        raise ValueError(f"a spike distribution needs V >= 2, got {vocab}")
    target = entropy.double()
    lo = torch.full_like(target, 1.0 / vocab)  # entropy log V
    hi = torch.full_like(target, MAX_SPIKE_MASS)  # entropy ~0
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        too_flat = spike_entropy(mid, vocab) > target  # entropy still too high: more mass on the spike
        lo = torch.where(too_flat, mid, lo)
        hi = torch.where(too_flat, hi, mid)
    return (lo + hi) / 2


def spike_ids(seed_key: tuple[int, ...], n: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n]`` int64 spike tokens, uniform over the vocabulary, fixed by ``seed_key`` (e.g.
    ``(run seed, step, micro-batch)``): the same key gives the same ids on any device."""
    digest = hashlib.sha256(repr(tuple(int(k) for k in seed_key)).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randint(0, vocab, (n,), generator=gen).to(device)


def spike_weak(p: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, vocab: int) -> WeakLogProbs:
    """Top-k form (k = 1, the spike) of mass ``p [N]`` on token ``ids [N]`` and the rest spread
    evenly, for rows whose labels are ``labels [N]``: exact, as the tail is uniform."""
    p = p.double()
    other = torch.log((1.0 - p) / (vocab - 1))  # [N]: every token but the spike
    hit = ids == labels
    n_known = torch.where(hit, 1, 2)  # K = {spike} or {spike, label}
    return WeakLogProbs(
        vocab,
        topk_logp=torch.log(p).float().unsqueeze(1),
        topk_ids=ids.long().unsqueeze(1),
        label_logp=torch.where(hit, torch.log(p), other).float(),
        tail_logmass=(other + torch.log((vocab - n_known).double())).float(),
    )


def uniform_weak(labels: torch.Tensor, vocab: int) -> WeakLogProbs:
    """``q_v = 1/V`` for the rows whose labels are ``labels [N]``, in top-k form (k = 1)."""
    return spike_weak(torch.full(labels.shape, 1.0 / vocab, dtype=torch.float64, device=labels.device),
                      torch.zeros_like(labels), labels, vocab)


def entropy_matched_weak(h_weak: torch.Tensor, w_weak: torch.Tensor, labels: torch.Tensor,
                         seed_key: tuple[int, ...], chunk_rows: int) -> WeakLogProbs:
    """The ``entropy_matched`` weak side of ``N`` rows: each row's real weak entropy (from
    ``h_weak [N, D]``, ``w_weak [V, D]``), a seeded random spike token, ``labels [N]``."""
    vocab = w_weak.shape[0]
    p = spike_mass_for_entropy(row_entropy(h_weak, w_weak, chunk_rows), vocab)
    return spike_weak(p, spike_ids(seed_key, labels.shape[0], vocab, labels.device), labels, vocab)
