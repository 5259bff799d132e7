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


def test_xdist_groups_keep_the_tiny_run_on_one_worker_and_modules_whole():
    """``make test`` runs on 2 pytest-xdist workers with ``--dist loadgroup``: every reader of the
    session's tiny run and every user of the token head land in one group (one worker trains the
    tiny run once); any other test runs with the rest of its folder (a folder's session fixtures,
    such as tests/stages' tokenised corpus, built once), or of its file at the top of tests/."""
    from tests.conftest import OBJECT_STORE_GROUP, TINY_RUN_GROUP, xdist_group_of

    assert xdist_group_of(["tmp_path", "tiny_job_run", "ray_cluster"], "tests/test_rerun.py") == TINY_RUN_GROUP
    assert xdist_group_of(["head", "ray_head"], "tests/cli/test_submit_real.py") == TINY_RUN_GROUP
    assert xdist_group_of(["tokenized_world"], "tests/stages/test_score.py") == "tests/stages"
    assert xdist_group_of(["tiny_world"], "tests/stages/test_tokenize.py") == "tests/stages"
    # the S3 users one at a time: the object-storage run checks that no wmss-* temp dir is left
    assert xdist_group_of(["ray_cluster", "s3_server"], "tests/test_pipeline_object_storage.py") == OBJECT_STORE_GROUP
    assert xdist_group_of(["s3_server", "tmp_path"], "tests/training/test_metrics.py") == OBJECT_STORE_GROUP
    assert xdist_group_of(["ray_cluster"], "tests/test_byo_model.py") == "tests/test_byo_model.py"


def test_make_test_runs_two_xdist_workers_by_group():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "-n $(TEST_WORKERS) --dist loadgroup" in makefile and "TEST_WORKERS ?= 2" in makefile
