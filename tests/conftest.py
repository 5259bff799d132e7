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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on a free 127.0.0.1 port, with a bucket.

    Sets the standard AWS environment (endpoint, dummy credentials, region) for this process,
    and for Ray workers when requested before ``ray_cluster``. The server is stopped by its pid.
    Yields ``{"endpoint", "bucket"}``.
    """
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import importlib.util

    if importlib.util.find_spec("moto.server") is None:
        pytest.fail("moto[server] is not installed: pip install -e '.[test]' (or 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="wmss-moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint} (log {log.name})")
                time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="wmss-test")
        try:
            yield {"endpoint": endpoint, "bucket": "wmss-test"}
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if not os.environ.get("WMSS_KEEP_MOTO_LOG"):
            os.unlink(log.name)
