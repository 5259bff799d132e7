"""The operator's console: a log of the run, with everything else in ``<run>/logs/``.

What the console shows (``wmss run``, ``wmss demo``, ``wmss tune`` and the ``jobs/``
entrypoints, whose driver output is what ``ray job logs`` shows): one line when each phase
starts and ends, a progress line per phase, warnings a user must act on (once each), the final
tables. Everything the libraries print (Ray, Ray Train's result lines, Ray Data's progress
bars, DeepSpeed, transformers, Python logging) goes to ``<run>/logs/driver-<time>.log`` instead,
unless ``--verbose``.

How: :func:`capture` points the process's file descriptors 1 and 2 at the log file (so output
of C extensions and of Ray's worker-log forwarding, which write to the fds, is caught too) and
keeps a duplicate of the original stdout for the console. Every console line is also written to
the log, so the log alone tells the whole story.

Progress: on a TTY a bar repainted in place (carriage return); anywhere else (a file, a pipe,
``ray job logs``) a plain line at most every ``every_s`` seconds, or every half of the phase's
age when that is longer: at 1, 2, 4, 8 ... minutes (a 10-minute phase: 4 lines), never a
carriage return.

Layer: ``io`` (the standard library only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

PREFIX = "[wmss]"
#: Seconds between two plain progress lines of one phase (non-TTY).
PLAIN_EVERY_S = 60.0
BAR_WIDTH = 24


def format_duration(seconds: float | None) -> str:
    """``'42s'``, ``'3:05'`` (m:ss) or ``'1:02:03'`` (h:mm:ss); ``'?'`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def format_rate(x: float | None) -> str:
    """A rate as people read it: ``71,429``, ``535``, ``2.81``, ``0.0156``; ``'-'`` when unknown."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x or x in (float("inf"), float("-inf")):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def eta_seconds(done: float, total: float | None, elapsed: float) -> float | None:
    """Seconds left at the rate so far (None before the first unit or without a total)."""
    if not total or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


def progress_text(name: str, done: float, total: float | None, unit: str, elapsed: float,
                  bar: bool = False) -> str:
    """One progress line: ``[wmss] sft  12/40 steps  0.80 steps/s  elapsed 15s  ETA 35s``.

    ``total`` None: only the count and the elapsed time (a phase without a known size);
    ``done`` 0 and no total: just "running". ``bar``: a ``[#####.....]`` bar after the name.
    """
    parts = [f"{PREFIX} {name}"]
    if bar and total:
        filled = int(BAR_WIDTH * min(1.0, done / total))
        parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
    if total:
        parts.append(f"{int(done)}/{int(total)} {unit}")
    elif done:
        parts.append(f"{int(done)} {unit}")
    else:
        parts.append("running")
    if done and elapsed > 0:
        parts.append(f"{done / elapsed:.3g} {unit}/s")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if total:
        parts.append(f"ETA {format_duration(eta_seconds(done, total, elapsed))}")
    return "  ".join(parts)


class Console:
    """Where the run's own lines go: ``stream`` (the terminal or the job log) and the log file.

    ``tty``: repaint progress in place; else plain progress lines at most every ``every_s``.
    Thread-safe: the progress monitor writes from its own thread.
    """

    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None, log: IO[str] | None = None,
                 every_s: float = PLAIN_EVERY_S, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.log = log
        self.every_s = every_s
        self.clock = clock
        self._lock = threading.Lock()
        self._bar_open = False  # a repainted bar is on the current terminal line
        self._last_plain: dict[str, float] = {}
        self._warned: set[str] = set()

    def _write(self, text: str, to_log: bool = True) -> None:
        self.stream.write(text)
        self.stream.flush()
        if to_log and self.log is not None:
            self.log.write(text if text.endswith("\n") else text + "\n")
            self.log.flush()

    def line(self, text: str) -> None:
        """A line of the run's log (every line of ``text`` when it has several)."""
        with self._lock:
            if self._bar_open:
                self.stream.write("\n")
                self._bar_open = False
            self._write(text.rstrip("\n") + "\n")

    def warn_once(self, text: str) -> None:
        """A warning the user must act on, shown once per text."""
        if text in self._warned:
            return
        self._warned.add(text)
        self.line(f"{PREFIX} warning: {text}")

    def progress(self, name: str, done: float, total: float | None, unit: str, elapsed: float) -> None:
        """Report a phase's progress: a repainted bar on a TTY, else a plain line when
        ``max(every_s, elapsed / 2)`` passed since this phase's last one."""
        if self.tty:
            text = progress_text(name, done, total, unit, elapsed, bar=True)
            with self._lock:
                self.stream.write("\r" + text + "\x1b[K")  # erase the rest of the old bar
                self.stream.flush()
                self._bar_open = True
            return
        now = self.clock()
        last = self._last_plain.get(name)
        if last is None:  # the phase's first call only starts its clock: a short phase prints none
            self._last_plain[name] = now
            return
        # the gap grows with the phase's age (never below every_s, else half the age: the lines
        # come at 1, 2, 4, 8 ... minutes): a long phase in a job log says it is alive in
        # ~log(time) lines (the demo's phase 0 under load, 25 min: 24 lines at one a minute, 5 so)
        if now - last < max(self.every_s, 0.5 * elapsed):
            return
        self._last_plain[name] = now
        self.line(progress_text(name, done, total, unit, elapsed))


_current: list[Console] = []


def get_console() -> Console:
    """The console of the running command (:func:`capture`), else one on today's ``sys.stdout``."""
    return _current[-1] if _current else Console(sys.stdout)


class ConsoleWarnings(logging.Handler):
    """Our loggers' warnings (``wmss_ray.*``, level WARNING and up) also reach the console, once each."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.warn_once(record.getMessage())
        except Exception:  # noqa: BLE001 - a console problem must not break the run
            self.handleError(record)


@contextlib.contextmanager
def capture(log_dir: str | None, verbose: bool = False) -> Iterator[Console]:
    """Send fds 1 and 2 (all library output) to ``<log_dir>/driver-<UTC time>.log`` and yield the
    console on the original stdout. ``verbose`` or ``log_dir`` None: nothing is redirected, the
    console is ``sys.stdout``. The fds are restored on exit, before an exception propagates (so
    its message and traceback reach the terminal)."""
    if verbose or not log_dir:
        console = Console(sys.stdout)
        _current.append(console)
        try:
            yield console
        finally:
            _current.remove(console)
        return
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, time.strftime("driver-%Y%m%d-%H%M%S.log", time.gmtime()))
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(path, "a", buffering=1, encoding="utf-8")
    term = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    console = Console(term, tty=os.isatty(saved[0]), log=log)
    console.log_path = path  # type: ignore[attr-defined]
    handler = ConsoleWarnings(console)
    logging.getLogger("wmss_ray").addHandler(handler)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _current.append(console)
    try:
        yield console
    finally:
        _current.remove(console)
        logging.getLogger("wmss_ray").removeHandler(handler)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        if console._bar_open:
            term.write("\n")
        term.close()
        log.close()


@contextlib.contextmanager
def monitor(console: Console, name: str, total: int | None, unit: str, probe=None,
            tick_s: float | None = None) -> Iterator[None]:
    """While the body runs, a daemon thread reports ``name``'s progress every ``tick_s`` seconds
    (1 on a TTY, 5 elsewhere; the console itself spaces plain lines ``every_s`` apart): ``probe()``
    gives the units done (none: elapsed time only). The thread is stopped and joined on exit."""
    stop = threading.Event()
    start = console.clock()
    tick = tick_s if tick_s is not None else (1.0 if console.tty else 5.0)

    def loop() -> None:
        while not stop.wait(tick):
            try:
                done = probe() if probe is not None else 0
            except Exception:  # noqa: BLE001 - progress must never break the phase
                done = 0
            console.progress(name, done, total, unit, console.clock() - start)

    console.progress(name, 0, total, unit, 0.0)  # starts the phase's clock for plain lines
    thread = threading.Thread(target=loop, name=f"wmss-progress-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
