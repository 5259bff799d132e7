"""Shared fixtures: a real local Ray cluster (session-scoped), tiny demo artefacts, GPU skips."""

from __future__ import annotations

import os
import tempfile

import pytest

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_GPU = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with its own temp dir, shared by every integration test.

    Started in-process with ``ray.init`` (never ``ray stop``: shutdown stops only what we started).
    4 logical CPUs on a 2-core machine so that 2 train workers plus Ray Data operators fit.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Short path: Ray's unix sockets live under the temp dir and have a ~107-char limit.
    temp_dir = tempfile.mkdtemp(prefix="wmss-ray-", dir="/tmp")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
