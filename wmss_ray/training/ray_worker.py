"""The function Ray Train runs on every worker: the Ray edge around ``rank_loop.run_rank``.

This module imports nothing heavy, and the phase it trains travels as pickled bytes, on purpose:
Ray Train's controller (one more process per run) unpickles the train function (by reference:
it imports this module) and its ``train_loop_config``. Before, that pulled torch, transformers
and pyarrow into the controller (3,717 modules, ~4 CPU-s of imports per run, and their memory
on the head node for the whole run); now only the workers load them.
"""

from __future__ import annotations

import pickle
from typing import Any


def phase_config(cfg: Any, spec: Any, pool_handles: list | None) -> dict[str, Any]:
    """``train_loop_config`` for :func:`train_loop_per_worker`: the config and the phase spec as
    pickled bytes (unpickled on the workers only), the pool's actor handles as they are (Ray
    serialises those itself)."""
    return {"phase": pickle.dumps((cfg, spec)), "pool": pool_handles}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: resume from Ray's checkpoint if there is one, train, report to Ray."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint

    from wmss_ray.training.rank_loop import run_rank
    from wmss_ray.training.stopping import StopPoll

    cfg, spec = pickle.loads(config["phase"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir), checkpoint_dir_name=name)

    def preemption() -> float | None:  # a barrier across the workers: called by all, every step
        info = ray.train.get_preemption_info()
        if info is None:
            return None
        return info.deadline_ms / 1000 if info.deadline_ms else float("inf")

    rank = ctx.get_world_rank()
    run_rank(cfg, spec, rank, ctx.get_world_size(), device, report=report,
             resume_dir=checkpoint.as_directory if checkpoint is not None else None,
             pool_handles=config.get("pool"), stop_poll=StopPoll(spec.out_dir, rank, device, preemption))
