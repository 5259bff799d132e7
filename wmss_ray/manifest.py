"""Phase manifests: what a phase read, what it wrote, and whether it finished.

Every phase writes ``<run_dir>/<phase>/manifest.json`` (local or object storage, via ``storage``). A phase is skipped on a re-run when its
manifest says ``completed`` with the same fingerprint; the fingerprint hashes the config sections
the phase depends on plus the fingerprints of the phases it reads from, so changing ``mix.lam``
reruns WMSS and what follows but not pre-training or SFT.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wmss_ray import storage

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    phase: str
    status: str  # "running" | "completed" | "failed"
    fingerprint: str
    config_hash: str
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float | None = None
    seconds: float | None = None
    error: str | None = None

    def write(self, phase_dir: str | Path) -> None:
        """Write atomically (tmp + rename; one PUT on object stores): never half a manifest."""
        storage.write_text(storage.join(str(phase_dir), MANIFEST),
                           json.dumps(asdict(self), indent=2, sort_keys=True, default=str))


def read_manifest(phase_dir: str | Path) -> Manifest | None:
    path = storage.join(str(phase_dir), MANIFEST)
    if not storage.exists(path):
        return None
    try:
        return Manifest(**json.loads(storage.read_text(path)))
    except (json.JSONDecodeError, TypeError):
        return None  # unreadable manifest: treat the phase as never run


def fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def now() -> float:
    return time.time()
