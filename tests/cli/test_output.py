"""``cli/output.py``: a command's console; Ray's late output stays in the run's log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A stand-in for the ``ray`` module with what run_console uses of it. Like Ray, it registers its
# shutdown as an exit hook when it connects, and its shutdown prints the worker lines still
# pending (Ray flushes its log deduplicator there: "... [repeated 7x across cluster]").
FAKE_RAY = """
    import atexit, sys, types
    ray = types.ModuleType("ray")
    ray.connected = False
    ray.is_initialized = lambda: ray.connected
    def init():
        ray.connected = True
        atexit.register(ray.shutdown)
    def shutdown():
        if ray.connected:
            ray.connected = False
            sys.stdout.write("(run_arm pid=7) [wmss] eval_wmss done [repeated 7x across cluster]\\n")
            sys.stdout.flush()
    ray.init, ray.shutdown = init, shutdown
    sys.modules["ray"] = ray
"""


def _run(tmp_path: Path, connect_before: bool) -> tuple[list[str], str]:
    script = textwrap.dedent(FAKE_RAY) + textwrap.dedent(f"""
        from wmss_ray.cli.output import run_console
        from wmss_ray.config.loading import load_config
        cfg = load_config("configs/test-tiny.yaml", ["run.storage={tmp_path}"])
        if {connect_before}:
            ray.init()
        with run_console(cfg) as console:
            ray.init()  # the command connects (ensure_ray), runs its phases
            console.line("final table")
        print("connected after:", ray.is_initialized())
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    (log,) = (tmp_path / "test-tiny" / "logs").glob("driver-*.log")
    return proc.stdout.splitlines(), log.read_text()


def test_ray_connected_by_the_command_is_closed_inside_the_capture(tmp_path):
    """The worker lines Ray prints when it disconnects land in the run's log, not after the
    command's final line on the terminal (as a study's arm tasks' lines did)."""
    out, log = _run(tmp_path, connect_before=False)
    assert out[1:] == ["final table", "connected after: False"], out
    assert "repeated 7x across cluster" in log


def test_ray_connected_before_the_command_stays_connected(tmp_path):
    """A connection the caller made (a test's cluster, a user of the Python API) is left open."""
    out, log = _run(tmp_path, connect_before=True)
    assert out[1:3] == ["final table", "connected after: True"], out
    assert "repeated 7x" not in log


def test_a_failing_disconnect_never_hides_the_commands_own_error(tmp_path):
    script = textwrap.dedent(FAKE_RAY) + textwrap.dedent(f"""
        def broken():
            raise RuntimeError("GCS went away")
        ray.shutdown = broken
        from wmss_ray.cli.output import run_console
        from wmss_ray.config.loading import load_config
        cfg = load_config("configs/test-tiny.yaml", ["run.storage={tmp_path}"])
        with run_console(cfg):
            ray.connected = True
            raise ValueError("the phase's own error")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 1 and "ValueError: the phase's own error" in proc.stderr, proc.stderr
    assert "[wmss] warning: disconnecting from Ray failed: GCS went away" in proc.stdout
