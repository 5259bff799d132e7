"""benchmarks/device_kit.py: the GPU check's run on a lent device machine is prepared and checked
here (its CPU smoke runs seeing only the device's packages: tests/test_gpu_check.py). These check
the kit itself: the carried wheels follow the lock and bring what they need, the calls fit the
device tool's limits, and the package hiding behaves as a missing package does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kit():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import device_kit

        yield device_kit
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_carried_wheels_are_the_locked_versions_and_bring_all_they_require(kit):
    """The device run tests what users install (the lock's versions: transformers too, not the
    image's older one), and nothing a carried wheel requires is missing there (the install uses
    --no-deps: a missing requirement would surface only at the device's first import)."""
    lock = kit.read_lock()
    for pin in kit.carried_pins():
        name, version = pin.split("==")
        assert lock[kit.normalize_name(name)] == version
    there = kit.device_distributions()
    for dist in kit.CARRIED:
        missing = kit.requirements(dist) - there
        assert not missing, (dist, missing)
    # what KINDS.md says the image lacks is carried, and Ray (over the carry limit) is not there at all
    assert {"deepspeed", "pydantic"} <= {kit.normalize_name(d) for d in kit.CARRIED} and "ray" not in there


def test_the_calls_fit_the_device_tools_limits(kit):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
        from gpu_check_setup import VARIANTS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    parts, budget, timeout = kit.FIRST_CALL
    assert len(kit.device_command(parts, budget)) <= kit.MAX_COMMAND and timeout <= kit.CALL_LIMIT_S
    assert budget + kit.CALL_SLACK_S <= timeout and kit.START_S + timeout < kit.SESSION_S
    # the check's own estimates of the first call's parts fit its budget (with the preparation, ~15 s)
    assert 15 + sum(gpu_check.GPU_SECONDS[p] for p in parts.split(",")) <= budget
    # the two calls between them name every part a one-GPU machine without Ray or vLLM runs
    second = kit.second_call(kit.SESSION_S - kit.START_S - timeout)
    assert second is not None and second[1] + kit.CALL_SLACK_S <= second[2] <= kit.CALL_LIMIT_S
    assert set(parts.split(",")) | set(second[0].split(",")) == set(gpu_check.ORDER) - {"ray", "engines"}
    # after the slowest start the second call's budget still admits score_gen; after a one-minute
    # start (and ~10 s of copying), exactness too
    assert 15 + gpu_check.GPU_SECONDS["score_gen"] <= second[1]
    quick = kit.second_call(kit.SESSION_S - 60 - timeout - 10)
    assert 15 + gpu_check.GPU_SECONDS["exact"] <= quick[1]
    assert kit.second_call(100) is None  # too little left: no call
    # what comes back: the report, its JSON, the log and one file per profiled variant
    assert 3 + sum(v.profile for v in VARIANTS) <= kit.MAX_FILES_BACK


def test_a_hidden_package_is_missing_to_import_to_probes_and_to_metadata(kit, tmp_path):
    """Hidden as where it is not installed: ``import`` raises, ``find_spec`` (a library's probe for
    an optional package) returns None, its metadata is not found; the image's packages and the
    standard library's private modules still import."""
    code = """
import importlib.metadata, importlib.util, sys
sys.path.insert(0, sys.argv[1])
import device_kit
device_kit.hide_all_but(device_kit.device_distributions())
import sysconfig, torch, yaml, pydantic  # stdlib (its _sysconfigdata module), image, carried
sysconfig.get_config_vars()
assert importlib.util.find_spec("ray") is None
try:
    importlib.metadata.version("ray")
    raise SystemExit("ray's metadata seen")
except importlib.metadata.PackageNotFoundError:
    pass
try:
    import ray
    raise SystemExit("ray imported")
except ModuleNotFoundError as err:
    print("hidden:", err.name)
"""
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "hidden: ray", proc.stdout + proc.stderr[-2000:]


def test_the_device_script_stops_at_once_without_its_wheels(tmp_path):
    """Run without ``.whl`` in the call's carry, it says what to do and exits 2 (no device time
    spent on a check that cannot import)."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    script = (REPO / "benchmarks" / "gpu_check_device.sh").read_text()
    (repo / "benchmarks" / "gpu_check_device.sh").write_text(script)
    proc = subprocess.run(["bash", "benchmarks/gpu_check_device.sh", "steps", "100"], cwd=repo, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}, timeout=60)
    assert proc.returncode == 2 and "device_kit.py wheels" in proc.stdout
    assert "device_kit.py wheels" in (tmp_path / "out" / "log.txt").read_text()
