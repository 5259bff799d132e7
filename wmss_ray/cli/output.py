"""The console of one command: ``wmss run|demo|score|train|eval|report|tune`` and the ``jobs/``
entrypoints run inside :func:`run_console`, which sends the libraries' output to the run's
``logs/`` folder (``wmss_ray.io.console.capture``) unless ``--verbose``.

The log folder is ``<run>/logs/`` for a local run dir; for a run dir in object storage it is
``<temp>/wmss-logs/<run.name>/`` on this machine (a log is appended line by line, which object
stores do not do), and the first console line says where. Ray's output, its late lines included,
stays in that log: the command disconnects from Ray before it gives the terminal back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.console import Console, capture


def log_dir_for(cfg: WMSSConfig) -> str:
    """Where the libraries' output of a run goes (see the module doc)."""
    run_dir = storage.location(cfg.run_dir())
    if storage.is_uri(run_dir):
        return os.path.join(tempfile.gettempdir(), "wmss-logs", cfg.run.name)
    return os.path.join(run_dir, "logs")


@contextlib.contextmanager
def run_console(cfg: WMSSConfig, verbose: bool = False, source: str | None = None) -> Iterator[Console]:
    """The command's console (library output captured into :func:`log_dir_for`, unless ``verbose``);
    its first line names the run dir, the config ``source`` when given, and the log file.

    Ray Data's progress bars are turned off when captured (they repaint with carriage returns;
    the phases' own progress lines replace them); ``RAY_DATA_DISABLE_PROGRESS_BARS`` set by the
    user wins. Set before Ray Data is imported, which reads it then.

    A Ray connection made inside the body is closed at its end, before the capture ends
    (:func:`_disconnect_ray`); one made before (a test's cluster, an API user's) is left open."""
    if not verbose:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with capture(None if verbose else log_dir_for(cfg), verbose) as console:
        connected_before = _connected_ray() is not None
        run_dir = storage.redact(storage.location(cfg.run_dir()))  # a URI never shows credentials
        path = getattr(console, "log_path", None)
        console.line(f"[wmss] run dir: {run_dir}" + (f" (config {source})" if source else "")
                     + (f"; library output (Ray, DeepSpeed, transformers): {path}" if path else ""))
        try:
            yield console
        finally:
            if not connected_before:
                _disconnect_ray()


def _connected_ray() -> Any:
    """The ``ray`` module when this process is connected to Ray, else None (Ray not imported)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _disconnect_ray() -> None:
    """Disconnect from the Ray this command connected to, while the library output is still
    captured. Ray forwards the workers' and tasks' output to the driver a moment after they write
    it, and its exit hook prints what is still pending (the ``[repeated Nx across cluster]``
    lines): left to that hook, those lines came after the command's final table, on the
    terminal (a study's arm tasks, for one). As the exit hook does, wait 0.5 s for lines in
    flight first. A cluster this process only joined keeps running; a local one started by the
    command stops, as it would at exit."""
    ray = _connected_ray()
    if ray is not None:
        time.sleep(0.5)
        try:
            ray.shutdown()
        except Exception as err:  # never hide the command's own error; Ray's exit hook tries again
            logging.getLogger("wmss_ray.cli").warning("disconnecting from Ray failed: %s", err)


@contextlib.contextmanager
def tracked(cfg: WMSSConfig) -> Iterator[None]:
    """Send the run to ``run.trackers`` (MLflow, W&B; ``stages/trackers.py``) when the body ends,
    also when it fails (what completed, marked failed); one console line per tracker run."""
    failed = True
    try:
        yield
        failed = False
    finally:
        if any(t != "tensorboard" for t in cfg.run.trackers):
            from wmss_ray.io.console import get_console
            from wmss_ray.pipeline import build_phases
            from wmss_ray.stages.trackers import log_run

            for name, run_id in log_run(cfg, [p.name for p in build_phases(cfg)], failed).items():
                get_console().line(f"[wmss] {name}: logged as run {run_id}")
