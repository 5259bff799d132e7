"""Ray Train's torch backend, held by each run's controller without importing torch.

Ray Train's ``TorchConfig`` lives in ``ray.train.torch.config``, which imports torch: every run's
controller unpickles it and so loads torch and the rest of ``ray.train.torch`` although it never
runs a tensor op (its only torch work is telling the workers to join a process group). Measured
here: a controller process with its imports is 176 MB and 1.6 CPU-s without them, 361 MB and
3.5 CPU-s with them, for every run: on the head node of a sweep or a study, where each concurrent
trial or arm has a controller, that is ~185 MB of head-node memory per run in flight; in the test
suite (~50 runs) the controllers took 223 CPU-s with torch, 134 without (BENCHMARKS.md).
:class:`RankGroupConfig` is the same configuration and does the same steps as Ray's
``_TorchBackend`` (CPU and GPU; no TPU: this project never asks Ray for one), but names Ray's
worker-side functions by module and name (:func:`_on_worker`), so torch is imported on the
workers only, where the ranks need it anyway.

The steps, as in Ray 2.60's ``_TorchBackend.on_start`` (``ray/train/torch/config.py``): rank 0's
node address and a free port as ``MASTER_ADDR``/``MASTER_PORT`` on every worker, the torchrun
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ...), then ``init_process_group`` on every
worker at once (``env://``, the backend's timeout). On shutdown, Ray's ``_shutdown_torch`` (the
process group destroyed when there are 2+ workers) within Ray's shutdown timeout. On GPU workers
the train function runs inside Ray's ``TorchConfigContextManager`` (the worker's CUDA device),
and workers on one node share ``CUDA_VISIBLE_DEVICES`` (NCCL needs to see its peers' GPUs).
tests/training/test_backend.py checks each against Ray's own.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S

log = logging.getLogger(__name__)

#: Where Ray keeps the worker-side torch functions and the train function's context.
RAY_TORCH_CONFIG = "ray.train.torch.config"


def _on_worker(name: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``ray.train.torch.config.<name>`` in the process this runs in (a worker): pickled by
    reference to this module, so the controller that sends it never imports torch."""
    return getattr(importlib.import_module(RAY_TORCH_CONFIG), name)(*args, **kwargs)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class WorkerDeviceContext:
    """Ray's ``TorchConfigContextManager`` (sets the worker's CUDA device), built on entry, in
    the worker that runs the train function."""

    def __enter__(self):
        self._inner = _on_worker("TorchConfigContextManager")
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


class _RankGroupBackend(Backend):
    share_cuda_visible_devices: bool = True  # as Ray's _TorchBackend: NCCL sees the node's GPUs

    def on_start(self, worker_group, backend_config: RankGroupConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_on_worker, "_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(i, _on_worker, "_setup_torch_process_group", backend=backend,
                                                   world_rank=i, world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: RankGroupConfig) -> None:
        futures = worker_group.execute_async(_on_worker, "_shutdown_torch", destroy_process_group=len(worker_group) > 1)
        timeout_s = int(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            log.warning("torch process group shutdown timed out after %d s", timeout_s)


@dataclass
class RankGroupConfig(BackendConfig):
    """``TorchConfig(backend=..., timeout_s=...)`` with ``init_method="env"``, as a ``TorchTrainer``'s
    ``torch_config``. ``backend``: ``"gloo"``, ``"nccl"``, or None for nccl when the workers have
    GPUs, else gloo."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _RankGroupBackend

    @property
    def train_func_context(self):
        return WorkerDeviceContext

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
