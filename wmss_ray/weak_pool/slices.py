"""A request's rows split over a replica's ``S`` shards, and the shards' replies merged back.

ZeRO-3 data-parallel inference: every shard of a replica forwards its *own* slice of the
micro-batch (each shard gathers every layer anyway, so forwarding the same rows on all ``S``
would be one GPU's work done ``S`` times). A slice is a contiguous run of whole rows, itself a
:class:`~.wire.WeakRequest`:

- padded ``[B, T]``: ``B`` rows cut into ``S`` runs of ``ceil``/``floor(B / S)`` rows, each run
  trimmed to its own longest row (right padding: the real tokens' hidden states do not depend on
  the padding after them);
- packed ``[1, L]``: the rows are the runs of ``position_ids`` restarting at 0; the cuts fall on
  row boundaries nearest to ``L / S`` tokens each (a packed slice's cost is its tokens).

Answer positions are row-major, so slice ``i``'s come after slice ``i - 1``'s: merging the
replies is a concatenation, and the merged reply is the unsplit request's, row for row. A shard
whose slice is empty (fewer rows than shards) gets ``None`` and still forwards a filler
(``server.WeakServer.join``) so that it joins the same ZeRO-3 gathers as the others.
"""

from __future__ import annotations

import numpy as np

from wmss_ray.weak_pool.wire import WeakReply, WeakRequest


def cut_points(sizes: np.ndarray, parts: int) -> np.ndarray:
    """Cuts ``c [parts + 1]`` (``c[0] = 0``, ``c[-1] = len(sizes)``, non-decreasing): part ``i``
    takes items ``c[i]:c[i+1]``, each cut at the item boundary nearest ``i / parts`` of the total
    size (a tie goes to the later boundary: 3 rows over 2 parts are 2 + 1)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    cum = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.float64))])  # [n + 1]
    targets = cum[-1] * np.arange(1, parts) / parts  # [parts - 1]
    hi = np.searchsorted(cum, targets, side="left").clip(1, len(cum) - 1)  # first boundary >= target
    lo = hi - 1
    cuts = np.where(targets - cum[lo] < cum[hi] - targets, lo, hi)
    return np.concatenate([[0], np.maximum.accumulate(cuts), [len(cum) - 1]]).astype(np.int64)


def _answer_range(req: WeakRequest, first_token: int, end_token: int) -> tuple[int, int]:
    """``[n0, n1)``: the answer positions (sorted flat indices) in ``[first_token, end_token)``."""
    return (int(np.searchsorted(req.positions, first_token, side="left")),
            int(np.searchsorted(req.positions, end_token, side="left")))


def _exact_in(req: WeakRequest, n0: int, n1: int) -> np.ndarray:
    """The request's ``exact_rows`` inside answer positions ``[n0, n1)``, renumbered from ``n0``."""
    rows = req.exact_rows
    return (rows[(rows >= n0) & (rows < n1)] - n0).astype(np.int32)


def _padded_slice(req: WeakRequest, r0: int, r1: int) -> WeakRequest:
    """Rows ``r0:r1`` of a padded request, trimmed to their longest row ``T_s``; a position
    ``b * T + t`` becomes ``(b - r0) * T_s + t``."""
    t = req.input_ids.shape[1]
    t_s = max(1, int(req.lengths[r0:r1].max()))
    n0, n1 = _answer_range(req, r0 * t, r1 * t)
    b, col = np.divmod(req.positions[n0:n1].astype(np.int64), t)
    return WeakRequest(input_ids=req.input_ids[r0:r1, :t_s], lengths=req.lengths[r0:r1],
                       positions=((b - r0) * t_s + col).astype(np.int32), labels=req.labels[n0:n1],
                       exact_rows=_exact_in(req, n0, n1))


def _packed_slice(req: WeakRequest, a: int, z: int) -> WeakRequest:
    """Tokens ``a:z`` (whole rows) of a packed request; a position ``p`` becomes ``p - a``."""
    n0, n1 = _answer_range(req, a, z)
    return WeakRequest(input_ids=req.input_ids[:, a:z], lengths=None, position_ids=req.position_ids[:, a:z],
                       positions=(req.positions[n0:n1] - a).astype(np.int32), labels=req.labels[n0:n1],
                       exact_rows=_exact_in(req, n0, n1))


def split_request(req: WeakRequest, parts: int) -> list[WeakRequest | None]:
    """``parts`` slices of ``req`` in row order (``None``: no rows for that part); ``[req]`` itself
    when ``parts == 1``."""
    if parts == 1:
        return [req]
    if not req.packed:
        cuts = cut_points(np.ones(req.input_ids.shape[0]), parts)  # rows: a padded row costs T either way
        return [_padded_slice(req, r0, r1) if r1 > r0 else None for r0, r1 in zip(cuts[:-1], cuts[1:])]
    starts = np.flatnonzero(req.position_ids[0] == 0)  # [rows] first token of each packed row
    ends = np.append(starts[1:], req.input_ids.shape[1])
    cuts = cut_points(ends - starts, parts)  # tokens: a packed row costs its length
    return [_packed_slice(req, int(starts[g0]), int(ends[g1 - 1])) if g1 > g0 else None
            for g0, g1 in zip(cuts[:-1], cuts[1:])]


def merge_replies(replies: list[WeakReply]) -> WeakReply:
    """The replies of a request's non-empty slices, in slice order, as the whole request's reply
    (each array concatenated along its first axis; ``exact_logp`` None when no slice has one)."""
    if not replies:
        raise ValueError("merge_replies needs the reply of at least one slice")
    first = replies[0]
    if len(replies) == 1:
        return first
    for r in replies[1:]:
        if (r.checkpoint_id, r.vocab, r.top_k) != (first.checkpoint_id, first.vocab, first.top_k):
            raise RuntimeError(f"shards of one replica answered with different models: {r.checkpoint_id} "
                               f"(V={r.vocab}, k={r.top_k}) vs {first.checkpoint_id} (V={first.vocab}, k={first.top_k})")
    out = WeakReply(first.checkpoint_id, first.vocab, first.top_k)
    for name in ("topk_logp", "topk_ids", "label_logp", "tail_logmass", "dense_logp", "exact_logp"):
        parts = [getattr(r, name) for r in replies if getattr(r, name) is not None]
        if parts:
            setattr(out, name, np.concatenate(parts))
    return out
