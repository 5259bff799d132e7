"""``io/console.py``: progress text, plain lines vs a repainted bar, the fd capture."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from wmss_ray.io.console import Console, eta_seconds, format_duration, monitor, progress_text

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_durations_and_eta():
    assert [format_duration(s) for s in (0, 42.4, 185, 3723, None, -1, float("nan"))] == \
        ["0s", "42s", "3:05", "1:02:03", "?", "?", "?"]
    assert eta_seconds(10, 40, 20.0) == 60.0
    assert eta_seconds(0, 40, 20.0) is None and eta_seconds(5, None, 2.0) is None


def test_progress_text():
    assert progress_text("sft", 12, 40, "steps", 15.0) == \
        "[wmss] sft  12/40 steps  0.8 steps/s  elapsed 15s  ETA 35s"
    assert progress_text("score_1", 0, None, "", 75.0) == "[wmss] score_1  running  elapsed 1:15"
    bar = progress_text("sft", 20, 40, "steps", 10.0, bar=True)
    assert "[" + "#" * 12 + "." * 12 + "]" in bar


def test_plain_lines_are_spaced_and_never_repaint():
    out, log, clock = io.StringIO(), io.StringIO(), Clock()
    c = Console(out, tty=False, log=log, every_s=60, clock=clock)
    c.progress("sft", 0, 40, "steps", 0.0)  # starts the phase's clock: no line
    for t in (10, 30, 59):
        clock.t = t
        c.progress("sft", t // 10, 40, "steps", t)
    assert out.getvalue() == ""
    clock.t = 61
    c.progress("sft", 6, 40, "steps", 61.0)
    clock.t = 100
    c.progress("sft", 9, 40, "steps", 100.0)  # 39 s after the last line: none
    clock.t = 121
    c.progress("sft", 12, 40, "steps", 121.0)  # 60 s after the last, but half the age is 60.5 s: none
    clock.t = 122
    c.progress("sft", 12, 40, "steps", 122.0)
    c.line("[wmss] sft done in 2:05")
    lines = out.getvalue().splitlines()
    assert lines == ["[wmss] sft  6/40 steps  0.0984 steps/s  elapsed 1:01  ETA 5:46",
                     "[wmss] sft  12/40 steps  0.0984 steps/s  elapsed 2:02  ETA 4:45", "[wmss] sft done in 2:05"]
    assert "\r" not in out.getvalue() and log.getvalue() == out.getvalue()
    # the lines come at 1, 2, 4 minutes of a phase's age
    for t in range(0, 300, 5):
        clock.t = 1000 + t
        c.progress("score_1", 0, None, "", float(t))
    assert [ln.split("elapsed ")[1] for ln in out.getvalue().splitlines() if "score_1" in ln] == ["1:00", "2:00", "4:00"]
    c.warn_once("disk almost full")
    # the lines come at 1, 2, 4 minutes of a phase's age
    for t in range(0, 300, 5):
        clock.t = 1000 + t
        c.progress("score_1", 0, None, "", float(t))
    assert [ln.split("elapsed ")[1] for ln in out.getvalue().splitlines() if "score_1" in ln] == ["1:00", "2:00", "4:00"]
    c.warn_once("disk almost full")
    assert out.getvalue().count("warning: disk almost full") == 1


def test_a_tty_gets_one_repainted_bar_that_the_next_line_ends():
    out = io.StringIO()
    c = Console(out, tty=True)
    c.progress("sft", 1, 4, "steps", 1.0)
    c.progress("sft", 2, 4, "steps", 2.0)
    c.line("[wmss] sft done")
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n[wmss] sft done\n")


def test_monitor_polls_the_probe_until_the_body_ends():
    out = io.StringIO()
    c = Console(out, tty=True)
    seen = []

    def probe():
        seen.append(1)
        return len(seen)

    with monitor(c, "sft", 100, "steps", probe, tick_s=0.01):
        while len(seen) < 3:
            pass
    n = len(seen)
    assert out.getvalue().count("\r") >= 3 and "/100 steps" in out.getvalue()
    assert len(seen) == n  # stopped


def test_capture_sends_library_output_to_the_log_and_console_lines_to_the_terminal(tmp_path):
    """In a child process (the capture moves fds 1 and 2): C-level writes, print, logging and
    a library's warning land in the log file; console lines reach the original stdout (a pipe
    here, so no carriage return) and the log; the fds are restored at the end."""
    script = textwrap.dedent(f"""
        import logging, os, sys
        from wmss_ray.io.console import capture, get_console
        logging.basicConfig(level=logging.INFO)
        with capture({str(tmp_path / "logs")!r}) as console:
            os.write(1, b"raw fd write\\n")
            os.write(2, b"raw stderr write\\n")
            print("library print")
            logging.getLogger("ray.train").info("Reporting training result 1")
            logging.getLogger("wmss_ray.x").warning("act on this")
            get_console().line("[wmss] sft started")
            console.progress("sft", 0, 4, "steps", 0.0)
        print("after capture")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[wmss] sft started", "[wmss] warning: act on this", "after capture"] or \
        proc.stdout.splitlines() == ["[wmss] warning: act on this", "[wmss] sft started", "after capture"]
    assert proc.stderr == ""
    (log,) = (tmp_path / "logs").glob("driver-*.log")
    text = log.read_text()
    for s in ("raw fd write", "raw stderr write", "library print", "Reporting training result 1",
              "act on this", "[wmss] sft started"):
        assert s in text, s
    assert "after capture" not in text
