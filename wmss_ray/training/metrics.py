"""Per-step training metrics: global reduction, ``metrics.jsonl`` and TensorBoard.

Each micro-batch's loss returns sums over its answer tokens (a ``losses.stats.LossStats``); a
step adds them over its micro-batches and all-reduces them over ranks (:func:`all_reduce_stats`),
so every metric is a global token-weighted mean, identical on all ranks (rank 0 writes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from wmss_ray.io import storage
from wmss_ray.losses.stats import LossStats

#: Keys of one ``metrics.jsonl`` line (plus ``samples_seen``, ``n_tokens``: this step's answer
#: tokens over all ranks, ``input_tokens``: its non-pad input tokens over all ranks, and the
#: cumulative :data:`COUNTERS`).
METRIC_KEYS = ("step", "loss", "ce_strong", "p_mix", "p_strong", "nontarget_ratio", "grad_norm", "lr",
               "tokens_per_s", "phase")
#: Cumulative cost counters of a ``metrics.jsonl`` line, over steps ``1..step``: ``tokens_seen``
#: (the sum of ``input_tokens``) and ``supervised_tokens_seen`` (the sum of ``n_tokens``). Each
#: checkpoint keeps them (``trainer_state.json``), so a resumed run continues them exactly.
COUNTERS = ("tokens_seen", "supervised_tokens_seen")


def is_log_step(done: int, log_every: int, end_step: int) -> bool:
    """Whether the step that completes ``done`` steps is logged: every ``log_every``-th, the first
    and the last of the run (the trainer writes those lines; the weak pool samples them)."""
    return done % log_every == 0 or done == end_step or done == 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over the default process group (no-op when not distributed)."""
    return _all_reduce(t, "sum")


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(t, op=reduce_op)
    return t


def all_reduce_stats(stats: LossStats) -> LossStats:
    """The step's stats over all ranks (collective: two all-reduces, SUM and MAX, of the
    tensors :meth:`LossStats.pack` lays out)."""
    to_sum, to_max = stats.pack()
    return LossStats.unpack(_all_reduce(to_sum, "sum"), _all_reduce(to_max, "max"))


def step_metrics(stats: LossStats, *, step: int, phase: str, grad_norm: float | None, lr: float,
                 step_time: float, input_tokens: float, samples_seen: int) -> dict[str, Any]:
    """Metrics of one optimizer step from the globally summed stats.

    ``nontarget_ratio`` is the non-target gradient mass the strong logits receive under the
    mix divided by plain CE's (DESIGN.md §1: < 1 means the mix damps the push on wrong tokens).
    """
    s = stats.floats()
    n = max(s["n_tokens"], 1.0)
    nt_strong = s["nontarget_grad_strong_sum"]
    return {
        "step": step,
        "loss": s["ce_mix_sum"] / n,
        "ce_strong": s["ce_strong_sum"] / n,
        "p_mix": s["p_mix_sum"] / n,
        "p_strong": s["p_strong_sum"] / n,
        "nontarget_ratio": s["nontarget_grad_mix_sum"] / nt_strong if nt_strong > 0 else float("nan"),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "tokens_per_s": input_tokens / step_time if step_time > 0 else float("nan"),
        "phase": phase,
        "samples_seen": samples_seen,
        "n_tokens": int(s["n_tokens"]),
        "input_tokens": int(input_tokens),
    }


def add_counters(counters: dict[str, int], metrics: dict[str, Any]) -> dict[str, int]:
    """:data:`COUNTERS` after the step of ``metrics`` (its ``input_tokens`` and ``n_tokens``) from
    ``counters`` (those after the step before)."""
    return {"tokens_seen": counters["tokens_seen"] + int(metrics["input_tokens"]),
            "supervised_tokens_seen": counters["supervised_tokens_seen"] + int(metrics["n_tokens"])}


def resumed_counters(state: dict[str, Any]) -> dict[str, int]:
    """:data:`COUNTERS` of a checkpoint's trainer state. A checkpoint written before they existed
    has none: the resumed run counts them from its step (the steps before it are not in them)."""
    return {key: int(state.get(key, 0)) for key in COUNTERS}


def pool_metrics(stats: LossStats, checkpoint_id: str | None, warn_above: float | None = None) -> dict[str, Any]:
    """The step's weak-pool metrics (``mix.placement: pool``) from its globally reduced stats.

    ``trunc_bound`` bounds this step's loss error from top-k truncation (nats per answer token);
    the ``trunc_error_sampled_*`` keys are measured against the exact weak log-probs on the
    sampled positions of logged steps. ``pool_wait_s``: the longest any rank waited for replies.
    """
    s = stats.floats()
    n = max(s["n_tokens"], 1.0)
    out = {"weak_tail_mass_mean": s["tail_mass_sum"] / n, "weak_tail_mass_max": s["tail_mass_max"],
           "trunc_bound": s["trunc_bound_sum"] / n, "pool_reply_bytes_per_token": s["pool_reply_bytes"] / n,
           "pool_wait_s": s["pool_wait_s"], "weak_checkpoint": checkpoint_id}
    if s["n_sampled"] > 0:
        out.update(trunc_error_sampled_mean=s["sampled_error_sum"] / s["n_sampled"],
                   trunc_error_sampled_max=s["sampled_error_max"],
                   trunc_bound_sampled_mean=s["sampled_bound_sum"] / s["n_sampled"], n_sampled=int(s["n_sampled"]))
    if warn_above is not None:
        out["trunc_warning"] = out["trunc_bound"] > warn_above
    return out


class MetricsWriter:
    """Rank 0's writer of ``<out_dir>/metrics.jsonl`` and ``<out_dir>/tb/``.

    On resume from step ``start_step`` the lines of later steps (written before a crash, after
    the checkpoint) are dropped and TensorBoard purges its events past ``start_step``, so the
    files hold exactly one record per logged step.
    """

    def __init__(self, out_dir: str, start_step: int = 0):
        # Object storage: write into a local temp dir and upload after each record (metrics) and
        # at close (tb/); the run's copy is downloaded first so a resumed phase continues it. The
        # dir is named after the URI, so a restarted writer on this node clears what a killed
        # one left behind.
        self.remote = out_dir if storage.is_remote(out_dir) else None
        if self.remote:
            digest = hashlib.sha256(self.remote.encode()).hexdigest()[:16]
            out_dir = os.path.join(tempfile.gettempdir(), f"wmss-metrics-{digest}")
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(out_dir)
            for sub in ("metrics.jsonl", "tb"):
                src = storage.join(self.remote, sub)
                if sub == "tb" and storage.is_dir(src):
                    storage.download_dir(src, os.path.join(out_dir, "tb"))
                elif sub != "tb" and storage.exists(src):
                    with open(os.path.join(out_dir, sub), "wb") as f:
                        f.write(storage.read_bytes(src))
        self.local_dir = out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._sync_metrics()
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step + 1 if start_step else None)

    def _sync_metrics(self) -> None:
        if self.remote and os.path.exists(self.path):
            storage.upload_file(self.path, storage.join(self.remote, "metrics.jsonl"))

    def _truncate_after(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if rec.get("step", 0) <= start_step:
                    keep.append(line)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def write(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self._sync_metrics()
        step = metrics["step"]
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self._tb.add_scalar(f"{metrics['phase']}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()
        if self.remote:
            try:
                tb = os.path.join(self.local_dir, "tb")
                if os.path.isdir(tb):
                    for root, _dirs, files in os.walk(tb):
                        for name in files:
                            src = os.path.join(root, name)
                            rel = os.path.relpath(src, self.local_dir).split(os.sep)
                            storage.upload_file(src, storage.join(self.remote, *rel))
            finally:
                shutil.rmtree(self.local_dir, ignore_errors=True)
