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


class PooledWeakSide:
    """A Train worker's weak side under ``mix.placement: pool`` (``PhaseWorker`` delegates to it).

    It keeps the micro-batches of each step it sent requests for, so that the step trains on the
    very tensors the pool answered (read once per step by the worker's own ``read_step``, kept
    until that step has run: at most ``1 + ceil(prefetch / grad_accum)`` steps), runs each
    micro-batch's forward with the pool's reply, and accumulates the step's pool metrics.

    Args:
        client: the pool's :class:`~.group.PoolClient`.
        read_step: ``step -> [grad_accum micro-batches]`` of this rank (the worker's reader).
        grad_accum, end_step: the plan's micro-batches per step, the step to stop at.
        is_logged: ``step (0-based) -> bool``, whether the trainer logs that step (logged steps
            also ask for ``exact_sample`` dense rows).
        prefetch, exact_sample, error_warn: ``mix.pool``'s settings.
        device: this rank's device.
    """

    def __init__(self, client: PoolClient, read_step: Callable[[int], list[dict]], grad_accum: int, end_step: int,
                 is_logged: Callable[[int], bool], prefetch: int, exact_sample: int, error_warn: float,
                 device) -> None:
        self._read, self._steps = read_step, {}
        self.error_warn, self.device = error_warn, torch.device(device)

        def n_exact(step: int, a: int) -> int:
            return exact_sample if a == 0 and is_logged(step) else 0

        self.feed = WeakFeed(client, lambda step, a: self._batches(step)[a], grad_accum, end_step, prefetch, n_exact)
        self.acc = torch.zeros(9, dtype=torch.float64, device=self.device)

    def _batches(self, step: int) -> list[dict]:
        if step not in self._steps:
            self._steps[step] = self._read(step)
        return self._steps[step]

    def micro_batches(self, step: int) -> list[dict]:
        """Step ``step``'s micro-batches (those its requests were built from); starts the step."""
        for old in [s for s in self._steps if s < step]:  # consumed
            del self._steps[old]
        self.acc.zero_()
        return self._batches(step)

    def forward(self, engine, b: dict, step: int, a: int, num_tokens: float, loss_scale: float):
        """``engine``'s ``(loss, stats)`` of micro-batch ``a`` of ``step`` with the pool's reply."""
        weak, exact, waited, nbytes = self.feed.get(step, a, self.device)
        # padded {input_ids, attention_mask, labels} or packed {input_ids, position_ids, labels}
        loss, vec, trunc = engine(b["input_ids"], b.get("attention_mask"), b["labels"], num_tokens=num_tokens,
                                  loss_scale=loss_scale, position_ids=b.get("position_ids"), weak_logp=weak,
                                  exact=exact)
        acc = self.acc  # pool_metrics' layout: 6 sums, 3 maxima
        acc[:5] += trunc[:5]
        acc[5] += nbytes
        acc[6:8] = torch.maximum(acc[6:8], trunc[5:7])
        acc[8] += waited  # seconds this rank waited for replies
        return loss, vec

    def step_metrics(self, n_tokens: float) -> dict:
        """The step's pool metrics (collective: every rank calls it once per step)."""
        return pool_metrics(self.acc, n_tokens, self.feed.checkpoint_id, self.error_warn)


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
