"""The test session's environment (tests/conftest.py): knobs every Ray process inherits."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def test_jit_op_cache_is_this_interpreters_own():
    """DeepSpeed's JIT ops (the CPU shm-comm op) are cached per venv: another venv's build in the
    shared default ~/.cache/torch_extensions would force a rebuild (~30-80 s) at each switch."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR")
    assert cache, "tests/conftest.py sets TORCH_EXTENSIONS_DIR before any Ray starts"
    default = Path.home() / ".cache" / "torch_extensions"
    assert Path(cache).resolve() != default.resolve()
    import hashlib

    assert hashlib.sha1(sys.prefix.encode()).hexdigest()[:12] in cache  # one per interpreter
