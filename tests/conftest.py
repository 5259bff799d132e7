"""Shared fixtures: a real local Ray cluster (session-scoped), a token-authenticated Ray head for
job tests, the tiny demo pipeline run once per session as a real Ray job, GPU skips."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_GPU = False

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "test-tiny.yaml"
# Measured: the tiny pipeline job took ~7.5 min on 2 cores shared at load average ~20.
TINY_JOB_DEADLINE_S = 720


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


@pytest.fixture(scope="session")
def ray_head():
    """A real local Ray head with token auth (``tests/jobs/local_head.py``), stopped by pid."""
    from tests.jobs.local_head import LocalRayHead

    head = LocalRayHead(num_cpus=4)
    try:
        head.start()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def tiny_job_run(ray_head, tmp_path_factory):
    """The shrunken demo (configs/test-tiny.yaml) through every phase, ONCE per session, as
    ``wmss submit`` sends it: a real ``ray job submit`` with the token to ``ray_head`` running
    ``python -m jobs.pipeline``. The job test asserts on the submission; the end-to-end tests
    assert on the run directory it leaves (and rerun parts of it in-process), so the tiny
    pipeline is trained once, not once per test file.

    Returns ``SimpleNamespace(cfg, job_id, status, logs)``; never fails itself (the tests do).
    """
    from tests.jobs.local_head import finish_job
    from wmss_ray import submit
    from wmss_ray.config import load_config

    overrides = [f"run.storage={tmp_path_factory.mktemp('tiny_runs')}"]
    with pytest.MonkeyPatch.context() as mp:  # the client side: the token from a file, as a user would
        for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            mp.delenv(var, raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_file))
        job_id = submit.submit_job(TINY, ray_head.dashboard_url, overrides=overrides, entrypoint="pipeline")
        status, logs = finish_job(job_id, ray_head, timeout_s=TINY_JOB_DEADLINE_S)
    return SimpleNamespace(cfg=load_config(TINY, overrides), job_id=job_id, status=status, logs=logs)
