"""Shared fixtures: a real local Ray cluster (session-scoped), a token-authenticated Ray head for
job tests, the tiny demo pipeline run once per session as a real Ray job, an S3 server (moto)
with a model cache of its own, GPU skips."""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# One OpenMP / torch intra-op thread per test process, as every Ray worker already has (its
# runtime env): `make test` runs two test processes next to Ray's on 2 cores, and two threads per
# process there made OpenMP threads spin against each other (tests/losses + training units +
# models on 2 xdist workers: 46.1 s / 80.0 CPU-s with torch's default threads, 35.0 s / 60.8
# CPU-s with one, side by side on the idle machine). Tests that are about threads set them
# explicitly (phase0.num_threads). Set before torch is imported: it reads this at start-up.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_GPU = False

# Ray Train V2's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) and
# acts on a finished run or a report only at a poll; a tiny test run lasts a few seconds, so the
# polls were most of it (3 train runs: 67-75 s at 2 s, 45 s at 0.25 s, measured side by side). Set
# before any Ray starts, so the in-process cluster, `ray start` heads and `wmss` subprocesses all
# inherit it. A slow poll is only a missed health check (fatal after 10 min), never a failure.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Two helper actors Ray Train starts per run, each a fresh process on these 2 cores, that no test
# uses: the preemption watcher (node drains) and Train's Prometheus metrics. Off in the test
# session only (a 2-worker empty fit: 15.6 -> 13.2 s, 3 fits each way, side by side; ~40 fits).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# Ray's log monitor (one per node) globs the node's log directory every 0.1 s while it holds
# fewer than this many files, else every 0.5 s; a session leaves hundreds of worker logs, and the
# monitors took 50 CPU-s of a suite run (a /proc sampler, 2026-12-06). Every 0.5 s from the start:
# a worker's first lines reach the driver up to 0.4 s later, which no test reads.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Each node's dashboard agent samples every process on the node (psutil) for Ray's metrics every
# 5 s; no test reads them (our runs write their own metrics and peaks). Every 60 s here: the
# agents took 42 CPU-s of a suite run, with hundreds of short-lived workers to walk (same sampler).
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")

# The venv's bin first on PATH, as in an activated venv and in the job head (local_head.py): DeepSpeed
# JIT-builds any op it needs with the first `ninja` on PATH (it built its CPU shm-comm op, until
# models/ds_comm.py stopped that: the guards below stay for any op a test may still build), and the venv's ninja (1.13, pip)
# and a system one (1.11, Debian) read each other's build logs as stale: each switch between the
# two rebuilt the op (~30 s), which happened twice per session (job head, then in-process tests).
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")

# DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR (default
# ~/.cache/torch_extensions, one per user): build.ninja names the venv's include paths, so two venvs
# on one machine (a CI clone's fresh venv, another checkout's) rebuilt an op at every switch
# (the shm-comm op's .ninja_log: 9 rebuilds in 4 h on the shared dev box; one in a full suite run,
# 49 CPU-s of cc1plus). One op cache per interpreter: built once per venv, then
# loaded. Set before any Ray starts, so workers and job heads inherit it.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(Path.home() / ".cache" / "wmss-torch-extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "test-tiny.yaml"
# Measured: the tiny pipeline job took ~7.5 min on 2 cores shared at load average ~20.
TINY_JOB_DEADLINE_S = 720


#: The files whose tests read the session's tiny run (``tiny_job_run``) or use the token-auth
#: head: one xdist worker runs them all, so the tiny pipeline is trained once.
#: (tests/test_session_env.py checks these sets against the collected tests' fixtures.)
TINY_RUN_FILES = frozenset({"tests/cli/test_submit_real.py", "tests/test_pipeline_e2e.py",
                            "tests/sweep/test_sweep.py", "tests/test_rerun.py", "tests/study/test_study_run.py"})
#: The files whose tests use the S3 server: one at a time, since the object-storage run checks
#: that it leaves no ``wmss-*`` temp dir, which any other object-store test makes for a while.
OBJECT_STORE_FILES = frozenset({"tests/cli/test_check_cluster.py", "tests/io/test_storage.py",
                                "tests/stages/test_report_storage.py", "tests/test_pipeline_object_storage.py",
                                "tests/test_plan.py", "tests/training/test_metrics.py",
                                "tests/study/test_table_storage.py", "tests/training/test_costs.py",
                                "tests/training/test_peak_storage.py"})


def xdist_group_of(path: str) -> str:
    """Which xdist worker group runs the tests of ``path`` (a test file, relative to the
    repository) under ``make test``: the tiny-run group, the object-store group, else the file's
    folder (a folder's conftest may share session fixtures, e.g. tests/stages' tokenised corpus),
    or for a file at the top of tests/ the file itself. A group runs whole on one worker, so its
    session and module fixtures (trained tiny models, runs) are built once, as without xdist."""
    if path in TINY_RUN_FILES:
        return "tiny_run"
    if path in OBJECT_STORE_FILES:
        return "object_store"
    folder = posixpath.dirname(path)
    return path if folder == "tests" else folder


#: The groups that take longest (BENCHMARKS.md: the 20 slowest), scheduled first, longest first:
#: a long group started last would leave the other worker idle at the end.
SLOW_GROUPS_FIRST = ("tiny_run", "tests/weak_pool", "tests/training", "object_store", "tests/test_gpu_check.py",
                     "tests/stages", "tests/test_byo_model.py", "tests/data")


#: Files that connect their process to a multi-node cluster of their own (``ray.cluster_utils``):
#: scheduled before every other group, so that no other test has started this process's one Ray
#: connection yet (they shut Ray down when done; ``ray_cluster`` then starts the session's).
OWN_CLUSTER_FILES = ("tests/test_node_faults.py",)


def _group_rank(item) -> int:
    group = xdist_group_of(item.nodeid.split("::")[0])
    if group in OWN_CLUSTER_FILES:
        return -1
    return SLOW_GROUPS_FIRST.index(group) if group in SLOW_GROUPS_FIRST else len(SLOW_GROUPS_FIRST)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
    # the slow groups first (a stable sort: every group keeps its tests' order); every xdist
    # worker sorts alike, and the scheduler takes the groups in this order
    items.sort(key=_group_rank)


def pytest_xdist_make_scheduler(config, log):
    """``make test``'s scheduler: xdist's load-scope scheduling with :func:`xdist_group_of` as the
    scope, whatever ``--dist`` says. (xdist's own ``--dist loadgroup`` marks do nothing under
    pytest 9: xdist 3.8 renames ``item._nodeid``, which pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the groups in collection order: slow ones first

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid.split("::")[0])

    return GroupScheduling(config, log)


def _object_store_env_first(request) -> None:
    """Start ``s3_server`` and ``model_cache`` before a Ray cluster when any collected test uses
    them: Ray's workers take their environment (AWS_*, WMSS_MODEL_CACHE) from the process that
    starts Ray, at the time it starts, whichever test happens to start it."""
    if any("s3_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("s3_server")
        request.getfixturevalue("model_cache")


#: The temp dirs (sockets, logs: ~10 MB each) of the Ray clusters this test process started.
_RAY_TEMP_DIRS: list[str] = []


@pytest.fixture(scope="session")
def ray_temp_dir():
    """A new temp dir for a Ray cluster's files, under /tmp (unix socket paths there stay under
    ~107 characters): removed at the end of the session when this process's tests all passed,
    kept and named when one failed (its raylet and worker logs say why)."""
    def make(prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        _RAY_TEMP_DIRS.append(path)
        return path

    return make


def pytest_sessionfinish(session, exitstatus):
    for path in _RAY_TEMP_DIRS:
        if exitstatus == 0:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"\nRay's files of this session are kept in {path}", file=sys.stderr)
    _RAY_TEMP_DIRS.clear()


@pytest.fixture(scope="session")
def ray_cluster(request, ray_temp_dir):
    """A real local Ray cluster with its own temp dir, shared by every integration test.

    Started in-process with ``ray.init`` (never ``ray stop``: shutdown stops only what we started).
    4 logical CPUs on a 2-core machine so that 2 train workers plus Ray Data operators fit.
    With the dashboard, as every real cluster runs: Ray's State API lives there, and Ray Train's
    PlacementGroupCleaner needs it to free the worker placement group of a run whose controller
    was killed (an ASHA-stopped tune trial); without it that group held CPUs for the rest of the
    session.
    """
    import ray

    _object_store_env_first(request)
    if ray.is_initialized():
        yield ray
        return
    temp_dir = ray_temp_dir("wmss-ray-")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # The job tests run a second cluster on this machine; the State API finds "its" cluster from
    # RAY_ADDRESS only (else it refuses to choose), so the workers get this cluster's GCS address,
    # on a port chosen here.
    from ray._private.services import get_node_ip_address

    from wmss_ray.cluster import free_port

    gcs_port = free_port()
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    try:
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _temp_dir=temp_dir,
            logging_level="WARNING",
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                                      "RAY_ADDRESS": f"{get_node_ip_address()}:{gcs_port}"}},
        )
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved
    assert ray.get_runtime_context().gcs_address.endswith(f":{gcs_port}")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on a free 127.0.0.1 port, with a bucket.

    Sets the standard AWS environment (endpoint, dummy credentials, region) for this process,
    and for Ray workers: ``ray_cluster``/``ray_head`` start it first when any collected test
    uses it. The server is stopped by its pid.
    Yields ``{"endpoint", "bucket"}``.
    """
    import importlib.util
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from wmss_ray.cluster import free_port

    if importlib.util.find_spec("moto.server") is None:
        pytest.fail("moto[server] is not installed: pip install -e '.[test]' (or 'moto[server]')")
    port = free_port()
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


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A per-node model cache of its own (``WMSS_MODEL_CACHE``), never the user's ~/.cache; set
    before Ray starts (see ``_object_store_env_first``) so that Ray's workers use it too."""
    from wmss_ray.io import storage

    cache = str(tmp_path_factory.mktemp("model-cache"))
    old = os.environ.get(storage.MODEL_CACHE_ENV)
    os.environ[storage.MODEL_CACHE_ENV] = cache
    try:
        yield cache
    finally:
        if old is None:
            os.environ.pop(storage.MODEL_CACHE_ENV, None)
        else:
            os.environ[storage.MODEL_CACHE_ENV] = old


#: The session's token-auth Ray head (``ray_head``) while it runs; whether ``tiny_job_run`` ran.
_HEADS: list = []
_TINY_JOB_DONE: list = []


@pytest.fixture(scope="session")
def ray_head(request):
    """A real local Ray head with token auth (``tests/cli/local_head.py``), stopped by pid.

    Stopped as soon as no later collected test needs it (``pytest_runtest_teardown``): none
    uses it and ``tiny_job_run`` (whose result outlives the head) has run or is not wanted; not
    at the end of the session: an idle head's GCS, raylet, dashboard and agents cost ~0.1 of a
    core, for ~14 min of the suite after the job tests (2-3 CPU-s per 30 s idle, measured)."""
    from tests.cli.local_head import LocalRayHead

    _object_store_env_first(request)  # the head copies this process's environment
    head = LocalRayHead(num_cpus=4)
    try:
        head.start()
        _HEADS.append(head)
        yield head
    finally:
        head.stop()
        _HEADS.clear()


def pytest_runtest_teardown(item, nextitem):
    """Stop the Ray head once no later test needs it (``ray_head``'s docstring)."""
    if not _HEADS:
        return
    items = item.session.items
    later = [getattr(it, "fixturenames", ()) for it in items[items.index(nextitem):]] if nextitem else []
    if not any("ray_head" in names or ("tiny_job_run" in names and not _TINY_JOB_DONE) for names in later):
        _HEADS.pop().stop()


@pytest.fixture(scope="session")
def tiny_job_run(request, tmp_path_factory):
    """The shrunken demo (configs/test-tiny.yaml) through every phase, ONCE per session, as
    ``wmss submit`` sends it: a real ``ray job submit`` with the token to ``ray_head`` running
    ``python -m jobs.pipeline``. The job test asserts on the submission; the end-to-end tests
    assert on the run directory it leaves (and rerun parts of it in-process), so the tiny
    pipeline is trained once, not once per test file.

    Returns ``SimpleNamespace(cfg, job_id, status, logs)``; never fails itself (the tests do).
    The head is asked for here, not as an argument: so the tests that read this run do not list
    ``ray_head`` among their fixtures, and the head stops once the job tests are done.
    """
    from tests.cli.local_head import finish_job
    from wmss_ray.cli import submit
    from wmss_ray.config.loading import load_config

    ray_head = request.getfixturevalue("ray_head")
    overrides = [f"run.storage={tmp_path_factory.mktemp('tiny_runs')}"]
    with pytest.MonkeyPatch.context() as mp:  # the client side: the token from a file, as a user would
        for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            mp.delenv(var, raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_file))
        job_id = submit.submit_job(TINY, ray_head.dashboard_url, overrides=overrides, entrypoint="pipeline")
        status, logs = finish_job(job_id, ray_head, timeout_s=TINY_JOB_DEADLINE_S)
    _TINY_JOB_DONE.append(True)
    return SimpleNamespace(cfg=load_config(TINY, overrides), job_id=job_id, status=status, logs=logs)
