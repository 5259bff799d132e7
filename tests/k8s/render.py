"""A small, strict, pure-Python renderer for the kustomize subset that ``k8s/`` uses.

Supported (and nothing else: any other kustomization key is an error, so a manifest that relies
on a feature this renderer does not implement fails the tests instead of rendering wrongly):

- ``resources``: YAML files (multi-document) and directories holding a ``kustomization.yaml``;
- ``patches``: JSON6902 operation lists (``add``, ``remove``, ``replace``, ``test``), from
  ``path`` or inline ``patch``, selected by ``target`` (``group``, ``version``, ``kind``,
  ``name``; exact match, all given fields must match, at least one resource must match).

When ``kubectl`` is installed, tests/k8s/test_manifests.py checks that this renderer and
``kubectl kustomize`` produce the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches"}
TARGET_KEYS = {"group", "version", "kind", "name"}


class RenderError(ValueError):
    pass


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


def _load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise RenderError(f"{path}: every document must be a Kubernetes object (apiVersion, kind)")
    return docs


def render(directory: str | Path) -> list[dict[str, Any]]:
    """Render a kustomization directory to a list of objects (in resource order)."""
    directory = Path(directory).resolve()
    kfile = _kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(
            f"{kfile}: unsupported kustomization keys {sorted(unknown)} (render.py supports {sorted(SUPPORTED_KEYS)})"
        )
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{kfile}: kind must be Kustomization")

    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            if directory not in path.parents:
                raise RenderError(f"{kfile}: file resource {entry} is outside the kustomization root")
            objects.extend(_load_docs(path))
        else:
            raise RenderError(f"{kfile}: resource {entry} not found")

    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"], obj.get("metadata", {}).get("name", ""))
        if key in seen:
            raise RenderError(f"{kfile}: duplicate object {key}")
        seen.add(key)

    for i, patch in enumerate(spec.get("patches") or []):
        ops, where = _patch_ops(directory, patch, f"{kfile}: patches[{i}]")
        targets = [o for o in objects if _matches(o, patch.get("target"), where)]
        if not targets:
            raise RenderError(f"{where}: target {patch.get('target')} matches no resource")
        for obj in targets:
            patched = apply_json6902(obj, ops, where)
            obj.clear()
            obj.update(patched)
    return objects


def _patch_ops(directory: Path, patch: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], str]:
    if set(patch) - {"path", "patch", "target"}:
        raise RenderError(f"{where}: unsupported patch keys {sorted(set(patch) - {'path', 'patch', 'target'})}")
    if ("path" in patch) == ("patch" in patch):
        raise RenderError(f"{where}: give exactly one of path / patch")
    if "path" in patch:
        where = f"{where} ({patch['path']})"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
    else:
        ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise RenderError(f"{where}: only JSON6902 patches (a list of operations) are supported")
    return ops, where


def _matches(obj: dict[str, Any], target: dict[str, Any] | None, where: str) -> bool:
    if not target:
        raise RenderError(f"{where}: a JSON6902 patch needs a target")
    if set(target) - TARGET_KEYS:
        raise RenderError(f"{where}: unsupported target keys {sorted(set(target) - TARGET_KEYS)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": obj["kind"], "name": obj.get("metadata", {}).get("name")}
    return all(actual[k] == v for k, v in target.items())


# ----------------------------------------------------------------------------- JSON6902


def _tokens(pointer: str, where: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise RenderError(f"{where}: JSON pointer {pointer!r} must start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _index(container: list[Any], token: str, where: str, allow_end: bool = False) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise RenderError(f"{where}: {token!r} is not a list index")
    idx = int(token)
    if idx > len(container) or (idx == len(container) and not allow_end):
        raise RenderError(f"{where}: list index {idx} out of range (length {len(container)})")
    return idx


def _parent(doc: Any, tokens: list[str], where: str) -> Any:
    node = doc
    for tok in tokens[:-1]:
        if isinstance(node, dict):
            if tok not in node:
                raise RenderError(f"{where}: path element {tok!r} does not exist")
            node = node[tok]
        elif isinstance(node, list):
            node = node[_index(node, tok, where)]
        else:
            raise RenderError(f"{where}: cannot descend into a scalar at {tok!r}")
    return node


def apply_json6902(obj: dict[str, Any], ops: list[dict[str, Any]], where: str = "patch") -> dict[str, Any]:
    """Apply RFC 6902 operations (add, remove, replace, test) to a copy of ``obj``."""
    doc = copy.deepcopy(obj)
    for n, op in enumerate(ops):
        here = f"{where} op {n} ({op.get('op')} {op.get('path')})"
        kind = op.get("op")
        if kind not in ("add", "remove", "replace", "test"):
            raise RenderError(f"{here}: unsupported op (render.py supports add, remove, replace, test)")
        tokens = _tokens(op.get("path", ""), here)
        if not tokens:
            raise RenderError(f"{here}: whole-document operations are not supported")
        parent, last = _parent(doc, tokens, here), tokens[-1]
        value = copy.deepcopy(op.get("value"))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise RenderError(f"{here}: missing value")
        if isinstance(parent, dict):
            exists = last in parent
            if kind in ("remove", "replace", "test") and not exists:
                raise RenderError(f"{here}: {last!r} does not exist")
            if kind == "remove":
                del parent[last]
            elif kind == "test":
                if parent[last] != value:
                    raise RenderError(f"{here}: test failed ({parent[last]!r} != {value!r})")
            else:
                parent[last] = value
        elif isinstance(parent, list):
            idx = _index(parent, last, here, allow_end=(kind == "add"))
            if kind == "add":
                parent.insert(idx, value)
            elif kind == "remove":
                parent.pop(idx)
            elif kind == "replace":
                parent[idx] = value
            elif parent[idx] != value:
                raise RenderError(f"{here}: test failed ({parent[idx]!r} != {value!r})")
        else:
            raise RenderError(f"{here}: parent is a scalar")
    return doc
