"""Deterministic splits by a hash of ``sample_id``: the validation split and seeded subsamples.

Both depend on the sample id alone (never on row order, file layout or the number of Ray
tasks), so the same corpus always gives the same split on any cluster, and a row's membership
does not change when other rows are added.

- ``in_validation(sample_id, fraction)``: a row is in the validation split iff
  ``u(sample_id) < fraction`` with ``u`` uniform in [0, 1) from sha256. Training keeps exactly
  the other rows, so the two are disjoint by construction. The salt is fixed (not ``run.seed``):
  every seed of a study selects on the same validation rows.
- ``seeded_subsample(ids, n, seed)``: the ``n`` ids with the smallest ``u_seed(id)``, returned
  in their original order (``evaluation.max_samples``).

``validation_source`` says where a run's validation split is (carved, a corpus, or the demo
world's), for anything that selects or stops early (``wmss_ray/sweep/driver.py``); reading it for
evaluation is ``data.ray_corpus.validation_eval_input``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from wmss_ray.config.schema import WMSSConfig

_VALIDATION_SALT = "wmss-validation"


def hash_unit(sample_id: str, salt: str) -> float:
    """A stable uniform number in [0, 1) for ``(salt, sample_id)`` (first 8 bytes of sha256)."""
    digest = hashlib.sha256(f"{salt}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_validation(sample_id: str, fraction: float) -> bool:
    """Whether ``sample_id`` belongs to the validation split of ``data.validation_fraction``."""
    return fraction > 0 and hash_unit(str(sample_id), _VALIDATION_SALT) < fraction


def seeded_subsample(ids: Sequence[str], n: int | None, seed: int) -> list[int]:
    """Indices of a seeded subsample of ``n`` ids (all when ``n`` is None or >= len), in order.

    Raises:
        ValueError: when ``ids`` repeat (a subsample by id needs unique ids).
    """
    if len(set(ids)) != len(ids):
        raise ValueError("seeded_subsample needs unique sample ids")
    if n is None or n >= len(ids):
        return list(range(len(ids)))
    salt = f"wmss-subsample-{seed}"
    chosen = sorted(range(len(ids)), key=lambda i: hash_unit(str(ids[i]), salt))[:n]
    return sorted(chosen)


def validation_source(cfg: WMSSConfig, outputs: dict[str, dict[str, Any]]) -> str | None:
    """The validation split (what anything that selects or stops early evaluates on), or None:
    rows carved by ``data.validation_fraction`` (tokenize's ``validation/``), else
    ``data.validation``, else the demo world's ``validation.jsonl`` (when it has rows)."""
    carved = outputs.get("tokenize", {}).get("validation")
    if carved:
        return carved
    if cfg.data.validation:
        return cfg.data.validation
    if cfg.models.demo and cfg.data.demo.n_validation > 0:
        return outputs.get("data", {}).get("validation")
    return None


def has_validation(cfg: WMSSConfig) -> bool:
    """Whether this config yields a validation split (checked before a sweep starts)."""
    return bool(cfg.data.validation or cfg.data.validation_fraction > 0
                or (cfg.models.demo and cfg.data.demo.n_validation > 0))
