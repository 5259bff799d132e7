"""``WeakFeed``: a Train worker's prefetching stream of weak replies (bounded back-pressure).

The feed returns what the pool computed (:class:`PoolReply`: the weak log-probs of the answer
positions, the exact rows of the sampled ones, and what the transfer cost); the training step
runs the strong forward and the loss with it (``training.worker``), in every placement alike.

Micro-batches are numbered in training order ``m = step * grad_accum + a``. Before the worker
computes micro-batch ``m``, :meth:`WeakFeed.get` makes sure the requests of ``m .. m + prefetch``
are in flight (at most ``prefetch + 1`` outstanding: the bound on back-pressure and on the
replies held in memory), then waits for ``m``'s reply. So with ``prefetch >= 1`` the pool
computes the next micro-batches' weak side while the strong model computes this one.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np
import torch

from wmss_ray.losses.weak_side import WeakLogProbs
from wmss_ray.weak_pool.group import PoolClient
from wmss_ray.weak_pool.wire import WeakRequest


class PoolReply(NamedTuple):
    """One micro-batch's weak side from the pool.

    ``weak``: the answer positions' log-probs (rows in ``labels[:, 1:] != -100`` order).
    ``exact``: ``(rows [n] int64, exact log-probs [n, V])`` of the sampled positions, or None.
    ``nbytes``: the reply's answer-position arrays (the sampled dense rows not counted);
    ``wait_s``: seconds this rank waited for it.
    """

    weak: WeakLogProbs
    exact: tuple[torch.Tensor, torch.Tensor] | None
    nbytes: int
    wait_s: float


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

    def get(self, step: int, a: int, device) -> PoolReply:
        """The pool's reply for micro-batch ``(step, a)``, on ``device``."""
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
        return PoolReply(reply.to_weak(device), exact, answer_bytes, waited)


class PooledWeakSide:
    """A Train worker's weak side under ``mix.placement: pool`` (``PhaseWorker`` delegates to it).

    It keeps the micro-batches of each step it sent requests for, so that the step trains on the
    very tensors the pool answered (read once per step by the worker's own ``read_step``, kept
    until that step has run: at most ``1 + ceil(prefetch / grad_accum)`` steps), and hands out
    each micro-batch's reply. The step itself (strong forward, loss, statistics) is the worker's.

    Args:
        client: the pool's :class:`~.group.PoolClient`.
        read_step: ``step -> [grad_accum micro-batches]`` of this rank (the worker's reader).
        grad_accum, end_step: the plan's micro-batches per step, the step to stop at.
        is_logged: ``step (0-based) -> bool``, whether the trainer logs that step (logged steps
            also ask for ``exact_sample`` dense rows).
        prefetch, exact_sample: ``mix.pool``'s settings.
        device: this rank's device.
    """

    def __init__(self, client: PoolClient, read_step: Callable[[int], list[dict]], grad_accum: int, end_step: int,
                 is_logged: Callable[[int], bool], prefetch: int, exact_sample: int, device) -> None:
        self._read, self._steps = read_step, {}
        self.device = torch.device(device)

        def n_exact(step: int, a: int) -> int:
            return exact_sample if a == 0 and is_logged(step) else 0

        self.feed = WeakFeed(client, lambda step, a: self._batches(step)[a], grad_accum, end_step, prefetch, n_exact)

    def _batches(self, step: int) -> list[dict]:
        if step not in self._steps:
            self._steps[step] = self._read(step)
        return self._steps[step]

    def micro_batches(self, step: int) -> list[dict]:
        """Step ``step``'s micro-batches (those its requests were built from); starts the step."""
        for old in [s for s in self._steps if s < step]:  # consumed
            del self._steps[old]
        return self._batches(step)

    def reply(self, step: int, a: int) -> PoolReply:
        """The pool's reply for micro-batch ``a`` of ``step`` (waits for it; keeps the next ones in flight)."""
        return self.feed.get(step, a, self.device)

    @property
    def checkpoint_id(self) -> str | None:
        """The weak checkpoint every reply so far came from (None before the first)."""
        return self.feed.checkpoint_id
