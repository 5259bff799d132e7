"""The package's import graph: no cycles between wmss_ray modules, and the layer rules.

Every module is parsed with ``ast`` (no import runs): top-level and lazy imports inside
functions count alike, relative imports are resolved, and ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module. Layers are in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "wmss_ray"
PKG = "wmss_ray"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (all of them, inside the package or not)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for a in node.names:  # "from wmss_ray.data import rejects" imports the module rejects
                if f"{target}.{a.name}" in known:
                    out.add(f"{target}.{a.name}")
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target in _imports(name, path, known):
            # "import wmss_ray.a.b" also runs wmss_ray.a's __init__, but that edge is Python's
            # doing, not a design choice: count the most specific known module only.
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name and target != PKG:
                deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lazy_and_relative_imports_are_seen(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from . import sib\n    from ..up import thing\n    import x.y\n")
    got = _imports("wmss_ray.data.m", f, {"wmss_ray.data.sib"})
    assert {"wmss_ray.data", "wmss_ray.data.sib", "wmss_ray.up", "x.y"} <= got


def test_no_import_cycles_between_wmss_ray_modules():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_only_torch_numpy_stdlib_and_core():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        if not (name == f"{PKG}.core" or name.startswith(f"{PKG}.core.")):
            continue
        for target in _imports(name, path, set(mods)):
            top = target.split(".")[0]
            ok = (target == f"{PKG}.core" or target.startswith(f"{PKG}.core.") or top in ("torch", "numpy")
                  or top in sys.stdlib_module_names or top == "__future__")
            if not ok:
                bad.append(f"{name} imports {target}")
    assert not bad, bad


BOTTOM = {"wmss_ray.cluster", "wmss_ray.storage", "wmss_ray.config", "wmss_ray.config_sections"}


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_bottom_layer_modules_import_no_phase_module(module):
    deps = _graph()[module]
    assert deps <= BOTTOM, deps


def test_ray_init_has_one_call_site():
    sites = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
                sites.append(f"{name}:{node.lineno}")
    assert len(sites) == 1 and sites[0].startswith("wmss_ray.cluster:"), sites
