"""The test session's environment (tests/conftest.py): knobs every Ray process inherits."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def test_jit_op_cache_is_this_interpreters_own():
    """DeepSpeed's JIT ops (any it builds; models/ds_comm.py keeps the shm-comm op unbuilt) are cached per venv: another venv's build in the
    shared default ~/.cache/torch_extensions would force a rebuild (~30-80 s) at each switch."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR")
    assert cache, "tests/conftest.py sets TORCH_EXTENSIONS_DIR before any Ray starts"
    default = Path.home() / ".cache" / "torch_extensions"
    assert Path(cache).resolve() != default.resolve()
    import hashlib

    assert hashlib.sha1(sys.prefix.encode()).hexdigest()[:12] in cache  # one per interpreter


def test_xdist_groups_keep_the_tiny_run_on_one_worker_and_folders_whole(request):
    """``make test`` runs on 2 pytest-xdist workers fed whole groups (tests/conftest.py's
    scheduler): every file that reads the session's tiny run or uses the token head in one group
    (one worker trains the tiny run once), every S3 user in one (one at a time), any other test
    with the rest of its folder (its session fixtures built once) or, at the top of tests/, of
    its file. The two file sets must name exactly the files whose tests use those fixtures."""
    from tests.conftest import OBJECT_STORE_FILES, TINY_RUN_FILES, xdist_group_of

    uses: dict[str, set[str]] = {"tiny": set(), "s3": set()}
    for item in request.session.items:  # every collected test, also on an xdist worker
        path = item.nodeid.split("::")[0]
        if {"tiny_job_run", "ray_head"} & set(item.fixturenames):
            uses["tiny"].add(path)
        if "s3_server" in item.fixturenames:
            uses["s3"].add(path)
    collected = {item.nodeid.split("::")[0] for item in request.session.items}
    # a partial run collects fewer files: check the sets against what was collected
    assert uses["tiny"] == TINY_RUN_FILES & collected and uses["s3"] == OBJECT_STORE_FILES & collected
    assert xdist_group_of("tests/test_rerun.py") == xdist_group_of("tests/cli/test_submit_real.py") == "tiny_run"
    assert xdist_group_of("tests/training/test_metrics.py") == "object_store"
    assert xdist_group_of("tests/stages/test_score.py") == xdist_group_of("tests/stages/test_tokenize.py") == "tests/stages"
    assert xdist_group_of("tests/test_byo_model.py") == "tests/test_byo_model.py"


def test_make_test_runs_two_xdist_workers():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "-n $(TEST_WORKERS)" in makefile and "TEST_WORKERS ?= 2" in makefile


def test_one_intra_op_thread_per_test_process():
    """Two test processes beside Ray's on 2 cores: one OpenMP / torch thread each, as Ray's
    workers (tests/conftest.py says why, with figures)."""
    import torch

    assert os.environ.get("OMP_NUM_THREADS") == "1" and torch.get_num_threads() == 1
