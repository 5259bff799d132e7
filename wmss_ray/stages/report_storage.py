"""The report of a run dir anywhere: a local/shared run dir in place, an object-storage one
through a local mirror.

``report.write_report`` reads and plots local files. For a run dir on object storage
(``s3://...``) :func:`write_report_at` downloads the few files the report reads (config,
``eval/``, metrics, scores, curriculum weights, manifests; never models, checkpoints or
tokenised data) into a temp dir, writes the report there, and uploads ``report/``; the paths
recorded in ``report_data.json`` are the run's URIs again, not the temp mirror's.

Layer: phase (3; imports ``report`` and ``storage``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from wmss_ray.io import storage
from wmss_ray.stages.report import write_report

REPORT_INPUTS = ("metrics.jsonl", "scores.parquet", "weights.parquet", "manifest.json")  # in <run>/<phase>/
PATH_KEYS = ("phases", "scores", "weights", "eval_dir")  # results keys holding paths the report reads


def write_report_at(run_dir: str, results: dict[str, Any], out_dir: str) -> str:
    """Write ``<out_dir>/report.html`` (PNGs, ``report_data.json`` beside it) for ``run_dir``,
    a local path or a URI; ``results`` as for ``report.write_report``. Returns the report's path."""
    if not storage.is_remote(run_dir):
        return str(write_report(run_dir, results, storage.join(out_dir, "report.html")))
    with tempfile.TemporaryDirectory(prefix="wmss-report-") as mirror, storage.staged_dir(out_dir) as local:
        storage.download_dir(run_dir, mirror, keep=is_report_input)
        local_results = {k: rebase(v, run_dir, mirror) if k in PATH_KEYS else v for k, v in results.items()}
        write_report(mirror, local_results, os.path.join(local, "report.html"))
        data_path = os.path.join(local, "report_data.json")
        with open(data_path) as f:
            data = rebase(json.load(f), mirror, run_dir)
        with open(data_path, "w") as f:
            json.dump(data, f, indent=2, default=str)
    return storage.join(out_dir, "report.html")


def is_report_input(rel: str) -> bool:
    """Whether the report reads the file at ``rel`` (``/``-separated, relative to the run dir)."""
    parts = rel.split("/")
    return rel == "config.yaml" or parts[0] == "eval" or (len(parts) == 2 and parts[1] in REPORT_INPUTS)


def rebase(value: Any, src: str, dst: str) -> Any:
    """``value`` (a path, or dicts/lists of them) with paths under ``src`` moved under ``dst``
    (a local dir or a URI; both sides use ``/``)."""
    src = src.rstrip("/")
    if isinstance(value, str) and value.startswith(src + "/"):
        return dst.rstrip("/") + value[len(src):]
    if isinstance(value, dict):
        return {k: rebase(v, src, dst) for k, v in value.items()}
    if isinstance(value, list):
        return [rebase(v, src, dst) for v in value]
    return value
