"""``WeakFeed``: a Train worker's prefetching stream of weak replies (bounded back-pressure).

Micro-batches are numbered in training order ``m = step * grad_accum + a``. Before the worker
computes micro-batch ``m``, :meth:`WeakFeed.get` makes sure the requests of ``m .. m + prefetch``
are in flight (at most ``prefetch + 1`` outstanding: the bound on back-pressure and on the
replies held in memory), then waits for ``m``'s reply. So with ``prefetch >= 1`` the pool
computes the next micro-batches' weak side while the strong model computes this one.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from wmss_ray.weak_pool.group import PoolClient
from wmss_ray.weak_pool.wire import WeakRequest


class WeakFeed:
    """Args:
        client: the pool's :class:`~.group.PoolClient`.
        batch: ``(step, a) -> collated micro-batch`` (the same tensors the worker trains on).
        grad_accum, end_step: micro-batches per step and the step to stop at (exclusive).
        prefetch: micro-batches requested ahead.
        n_exact: ``(step, a) -> answer positions also requested dense`` (measured error).
    """

    def __init__(self, client: PoolClient, batch: Callable[[int, int], dict], grad_accum: int, end_step: int,
                 prefetch: int, n_exact: Callable[[int, int], int]):
        self.client, self.batch, self.grad_accum, self.end_step = client, batch, grad_accum, end_step
        self.prefetch, self.n_exact = prefetch, n_exact
        self.pending: dict[int, tuple] = {}  # m -> (ticket, exact_rows)
        self.checkpoint_id: str | None = None
        self.bytes_received = 0

    def _submit(self, m: int) -> None:
        step, a = divmod(m, self.grad_accum)
        req = WeakRequest.from_batch(self.batch(step, a), self.n_exact(step, a))
        self.pending[m] = (self.client.submit(req), req.exact_rows)

    def get(self, step: int, a: int, device) -> tuple:
        """``(WeakLogProbs, exact or None, seconds waited, reply bytes)`` for micro-batch ``(step, a)``.

        The bytes are the answer positions' arrays (the sampled dense rows are not counted).

        ``exact`` is ``(rows [n] int64, exact log-probs [n, V])`` for the sampled positions.
        """
        m = step * self.grad_accum + a
        last = self.end_step * self.grad_accum - 1
        for ahead in range(m, min(m + self.prefetch, last) + 1):
            if ahead not in self.pending:
                self._submit(ahead)
        for old in [k for k in self.pending if k < m]:  # a resumed / skipped stream: drop stale ones
            del self.pending[old]
        ticket, rows = self.pending.pop(m)
        t0 = time.perf_counter()
        reply = self.client.get(ticket)
        waited = time.perf_counter() - t0
        if self.checkpoint_id is None:
            self.checkpoint_id = reply.checkpoint_id
        elif reply.checkpoint_id != self.checkpoint_id:
            raise RuntimeError(f"weak pool answered with checkpoint {reply.checkpoint_id}, expected "
                               f"{self.checkpoint_id}: every replica must serve the same weak model")
        answer_bytes = reply.nbytes - (reply.exact_logp.nbytes if reply.exact_logp is not None else 0)
        self.bytes_received += answer_bytes
        exact = None
        if reply.exact_logp is not None:
            exact = (torch.from_numpy(np.asarray(rows, np.int64)).to(device), reply.exact(device))
        return reply.to_weak(device), exact, waited, answer_bytes


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op)
    return t


def pool_metrics(pool: torch.Tensor, n_tokens: float, checkpoint_id: str | None,
                 warn_above: float | None = None) -> dict:
    """The step's weak-pool metrics from this rank's float64 ``[9]`` accumulator (collective).

    ``pool`` = ``PairLM.POOL_STAT_NAMES``' 5 sums and reply bytes, then its 2 maxima and the
    seconds waited for replies, over the micro-batches. Sums are all-reduced, maxima
    max-reduced; ``n_tokens`` is the step's global answer-token count. ``trunc_bound`` bounds
    this step's loss error from top-k truncation (nats per answer token); the
    ``trunc_error_sampled_*`` keys are measured against the exact weak log-probs on the sampled
    positions of logged steps.
    """
    from torch.distributed import ReduceOp

    sums = _all_reduce(pool[:6].clone(), ReduceOp.SUM).tolist()
    maxes = _all_reduce(pool[6:9].clone(), ReduceOp.MAX).tolist()
    n = max(n_tokens, 1.0)
    out = {"weak_tail_mass_mean": sums[0] / n, "weak_tail_mass_max": maxes[0], "trunc_bound": sums[1] / n,
           "pool_reply_bytes_per_token": sums[5] / n, "pool_wait_s": maxes[2], "weak_checkpoint": checkpoint_id}
    if sums[4] > 0:
        out.update(trunc_error_sampled_mean=sums[2] / sums[4], trunc_error_sampled_max=maxes[1],
                   trunc_bound_sampled_mean=sums[3] / sums[4], n_sampled=int(sums[4]))
    if warn_above is not None:
        out["trunc_warning"] = out["trunc_bound"] > warn_above
    return out
