"""What a finished training phase cost, from the files it left: the study's cost columns.

:func:`phase_costs` reads a phase directory (local or a storage URI) as the training loop and the
pipeline wrote it: the last line of ``metrics.jsonl`` (optimizer updates and the cumulative token
counters, ``metrics.COUNTERS``), the ranks' ``workers.jsonl`` (``workers_rank<r>.jsonl`` on object
storage, ``rank_loop._log_worker``: peak host and GPU memory) and ``manifest.json`` (wall seconds
of every run of the phase: ``Manifest.total_seconds``). What is missing is None, never a guess.
"""

from __future__ import annotations

import json
from typing import Any

from wmss_ray.io import storage
from wmss_ray.io.files import read_metrics
from wmss_ray.io.manifest import read_manifest


def phase_costs(phase_dir: str) -> dict[str, Any]:
    """The cost of the training phase in ``phase_dir``.

    Returns ``{"updates", "supervised_tokens", "tokens", "seconds", "peak_rss_mb", "peak_gpu_mb"}``:
    ``updates`` the last logged step (the last step is always logged), ``supervised_tokens`` /
    ``tokens`` its ``supervised_tokens_seen`` / ``tokens_seen`` (answer / non-pad input tokens of
    steps 1..updates, all ranks), ``seconds`` the manifest's ``total_seconds`` (every run of the
    phase: the last and the interrupted ones it resumed), ``peak_rss_mb`` the largest any rank
    recorded in any event, ``peak_gpu_mb`` the same for GPU memory (None on the CPU). Each is None
    when its file or key is missing.
    """
    phase_dir = str(phase_dir)
    metrics_path = storage.join(phase_dir, "metrics.jsonl")
    last = (read_metrics(metrics_path) or [{}])[-1] if storage.exists(metrics_path) else {}
    manifest = read_manifest(phase_dir)
    records = worker_records(phase_dir)
    return {"updates": last.get("step"), "supervised_tokens": last.get("supervised_tokens_seen"),
            "tokens": last.get("tokens_seen"), "seconds": manifest.total_seconds if manifest is not None else None,
            "peak_rss_mb": _largest(records, "peak_rss_mb"), "peak_gpu_mb": _largest(records, "peak_gpu_mb")}


def worker_records(phase_dir: str) -> list[dict[str, Any]]:
    """Every event of every rank: ``workers.jsonl`` and ``workers_rank<r>.jsonl`` (object storage).

    Raises:
        ValueError: naming the file and line that is not JSON.
    """
    records = []
    for name in storage.list_entries(phase_dir):
        if name != "workers.jsonl" and not (name.startswith("workers_rank") and name.endswith(".jsonl")):
            continue
        path = storage.join(phase_dir, name)
        for n, line in enumerate(storage.read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{storage.redact(path)}, line {n}: not JSON ({err})") from None
    return records


def _largest(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return max(values) if values else None
