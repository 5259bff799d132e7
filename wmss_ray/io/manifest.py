"""Phase manifests: what a phase read, what it wrote, and whether it finished.

Every phase writes ``<run_dir>/<phase>/manifest.json`` (local or object storage, via ``storage``). A phase is skipped on a re-run when its
manifest says ``completed`` with the same fingerprint; the fingerprint hashes the config sections
the phase depends on plus the fingerprints of the phases it reads from, so changing ``mix.lam``
reruns WMSS and what follows but not pre-training or SFT.

A phase that runs keeps what its directory holds only to resume an interrupted run of the same
fingerprint (:func:`prepare_phase_dir`); anything else there (another run's checkpoints,
metrics, model, parts) is deleted first, so a rerun with new settings never resumes, reports or
mixes in the old run's work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wmss_ray.io import storage
from wmss_ray.io.console import get_console

log = logging.getLogger("wmss_ray.io.manifest")

MANIFEST = "manifest.json"
#: Statuses of a phase that started and did not finish; its work resumes only under the same fingerprint.
#: ``stopped``: ended on purpose short of its end (a tune trial's chunk), resumable like a crash.
UNFINISHED = ("running", "failed", "stopped")


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
    seconds: float | None = None  # this run's wall time (started_at to finished_at)
    # the wall time of the earlier, interrupted runs of this phase that this one resumed
    # (:func:`interrupted_seconds`): a resumed phase costs them too
    earlier_seconds: float = 0.0
    error: str | None = None
    # a training phase: the values of its layout keys (``Phase.layout``) its fingerprint was
    # computed with, which a resume at another layout keeps (``fingerprint_at_layout``)
    layout: dict[str, Any] | None = None

    @property
    def total_seconds(self) -> float | None:
        """Wall seconds of every run of the phase: this one and the interrupted ones it resumed."""
        return None if self.seconds is None else round(self.seconds + self.earlier_seconds, 2)

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


#: On object storage (no symbolic links) a phase linked from another run is a reference file
#: ``<run_dir>/<phase>.link`` holding ``{"target": "<the other run's phase directory>"}``.
LINK_SUFFIX = ".link"


def link_phase(target: str, phase_dir: str) -> None:
    """Make ``phase_dir`` stand for another run's phase directory ``target`` (a tune trial's or
    ``best.yaml``'s shared phases): locally a symbolic link, on object storage a reference file
    ``<phase_dir>.link``. Either way the runner reads the phase through it and never reruns it
    in place (``pipeline.run_phases``)."""
    if not storage.is_remote(phase_dir):
        local = storage.resolve_fs(phase_dir)[1]
        os.makedirs(os.path.dirname(local), exist_ok=True)
        os.symlink(storage.resolve_fs(target)[1], local, target_is_directory=True)
        return
    storage.write_text(phase_dir.rstrip("/") + LINK_SUFFIX, json.dumps({"target": storage.location(target)}))


def unlink_phase(phase_dir: str) -> None:
    """Remove the link ``phase_dir`` (:func:`link_phase`), never what it stands for."""
    if not storage.is_remote(phase_dir):
        local = storage.resolve_fs(phase_dir)[1]
        if os.path.islink(local):
            os.unlink(local)
        return
    storage.delete_file(phase_dir.rstrip("/") + LINK_SUFFIX)


def linked_phase(phase_dir: str) -> str | None:
    """The directory ``phase_dir`` stands for when it is linked (:func:`link_phase`), else None."""
    if not storage.is_remote(phase_dir):
        local = storage.resolve_fs(phase_dir)[1]
        return os.path.realpath(local) if os.path.islink(local) else None
    ref = phase_dir.rstrip("/") + LINK_SUFFIX
    if not storage.exists(ref):
        return None
    try:
        return str(json.loads(storage.read_text(ref))["target"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{storage.redact(ref)}: not a phase reference ({{\"target\": URI}}): {err}") from None


def fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _section(cfg_dict: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _nulled(cfg_dict: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    if not keys:
        return cfg_dict
    out = copy.deepcopy(cfg_dict)
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and leaf in node:
            node[leaf] = None
    return out


def phase_fingerprint(name: str, sections: list[str], needs: list[str], cfg_dict: dict[str, Any],
                      prints: dict[str, str], ignores: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> str:
    """A phase's fingerprint: its name, the config ``sections`` it depends on (``ignores`` nulled,
    not dropped), the fingerprints of the phases it ``needs``, and ``extra`` inputs (hashed only
    when given, so phases without them keep their fingerprints)."""
    cfg_dict = _nulled(cfg_dict, ignores)
    parts = {"phase": name, "config": {s: _section(cfg_dict, s) for s in sections},
             "upstream": {n: prints.get(n) for n in needs}}
    return fingerprint({**parts, "extra": extra} if extra is not None else parts)


def layout_of(cfg_dict: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The dotted ``keys`` present in ``cfg_dict`` and their values (an absent key stays absent:
    a key of ``ADDED_KEYS`` at its default is not in a fingerprint's config dict)."""
    out = {}
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = _section(cfg_dict, ".".join(parents)) if parents else cfg_dict
        if isinstance(node, dict) and leaf in node:
            out[dotted] = node[leaf]
    return out


def with_layout(cfg_dict: dict[str, Any], keys: tuple[str, ...], layout: dict[str, Any]) -> dict[str, Any]:
    """``cfg_dict`` with its ``keys`` replaced by ``layout``'s (removed where ``layout`` has none)."""
    out = copy.deepcopy(cfg_dict)
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict):
            continue
        node.pop(leaf, None)
        if dotted in layout:
            node[leaf] = layout[dotted]
    return out


def now() -> float:
    return time.time()


def stale_reason(old: Manifest | None, fingerprint: str, forced: bool) -> str | None:
    """Why a phase directory's contents must not be resumed; None when they may be (an unfinished
    run of the same fingerprint, not forced)."""
    if forced:
        return "the phase was forced (--from)"
    if old is None:
        return "no readable manifest says which run wrote them"
    if old.fingerprint != fingerprint:
        return f"they belong to a run with other inputs (fingerprint {old.fingerprint}, now {fingerprint})"
    if old.status not in UNFINISHED:
        return f"that run ended {old.status}"
    return None


def interrupted_seconds(old: Manifest, phase_dir: str) -> float:
    """The wall seconds that the unfinished run ``old`` of ``phase_dir`` (and the runs it resumed)
    spent: to its ``finished_at`` (failed, stopped), else, when its driver was killed and wrote no
    end, to the last file written in the phase directory (checkpoints, metrics, rank events), a
    lower bound (what ran after the last write is not counted)."""
    end = old.finished_at or max(storage.last_modified(phase_dir) or 0.0, old.started_at)
    return round(old.earlier_seconds + max(0.0, end - old.started_at), 2)


def prepare_phase_dir(phase_dir: str, name: str, fingerprint: str, forced: bool = False) -> bool:
    """Make ``phase_dir`` ready for a run of ``fingerprint``; True when it resumes the work there.

    An unfinished run of the same fingerprint (crashed, killed, stopped) keeps everything: its
    training phase resumes from its last checkpoint. Otherwise everything in the directory is
    deleted first (Ray Train checkpoints, ``metrics.jsonl``, ``tb/``, ``workers.jsonl``,
    ``model/``, parts, the manifest), and one line says what and why.
    """
    old = read_manifest(phase_dir)
    entries = storage.list_entries(phase_dir)
    reason = stale_reason(old, fingerprint, forced)
    if reason is None:
        get_console().line(f"[wmss] phase {name}: resuming the interrupted run of the same inputs ({old.status})")
        return True
    if entries:
        shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
        get_console().line(f"[wmss] phase {name}: cleared {storage.redact(str(phase_dir))} ({shown}): {reason}")
        log.info("phase %s: cleared %d entries: %s", name, len(entries), reason)
        storage.reset_dir(phase_dir)
    return False
