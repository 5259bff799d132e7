"""The repository's import graph: no cycles between any of its modules, and the layer rules.

Every module of every package of the repository (``wmss_ray`` and the thin ``jobs/`` and
``tune/`` entrypoints) is parsed with ``ast`` (no import runs): top-level and lazy imports inside
functions count alike, relative imports are resolved, and ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module. The layers (what each folder may import) are in
docs/ARCHITECTURE.md and in ``LAYERS`` below.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG_DIR = REPO / "wmss_ray"
PKG = "wmss_ray"
PACKAGES = ("wmss_ray", "jobs", "tune")  # every package of the repository (tests and benchmarks aside)


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _parse(path: Path) -> ast.Module:
    """``ast.parse`` of a module, tried again on CPython 3.11's "AST constructor recursion depth
    mismatch" SystemError: an interpreter-internal error, not a property of the file (seen once
    in CI, parsing config/schema.py, which parsed cleanly in every other run). A real syntax
    problem is a SyntaxError, raised as is."""
    for attempt in range(3):
        try:
            return ast.parse(path.read_text(), filename=str(path))
        except SystemError as err:
            if "recursion depth mismatch" not in str(err) or attempt == 2:
                raise


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> ast.Module:
    return _parse(path)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (all of them, inside the package or not)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(_parsed(path)):
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


def test_every_package_of_the_repository_is_covered():
    names = set(_graph())
    assert {"wmss_ray.pipeline", "jobs.pipeline", "jobs.check_cluster", "tune.page", "wmss_ray.sweep.trial"} <= names


def test_no_import_cycles_between_modules():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _room(module: str) -> str:
    """The folder (or top-level module) a module belongs to: ``wmss_ray.training.worker`` -> ``training``."""
    parts = module.split(".")
    if parts[0] != PKG:
        return parts[0]  # jobs, tune
    return parts[1] if len(parts) > 1 else PKG


#: What each room may import, bottom to top (docs/ARCHITECTURE.md, "Layers").
LAYERS = {
    "losses": set(),
    "io": set(),
    "config": {"io"},
    "cluster": {"config", "io"},
    "data": {"losses", "config", "io"},
    "models": {"data", "config", "io"},
    "stages": {"losses", "config", "io", "cluster", "data", "models"},
    "weak_pool": {"losses", "config", "io", "cluster", "models"},
    "training": {"losses", "config", "io", "cluster", "data", "models", "stages", "weak_pool"},
    "phases": {"config", "io", "cluster", "data", "stages", "training"},
    "pipeline": {"config", "io", "cluster", "data", "stages", "training", "phases"},
    "plan": {"losses", "config", "io", "models", "training", "weak_pool"},
    "sweep": {"config", "io", "cluster", "data", "stages", "training", "phases", "pipeline"},
    "study": {"config", "io", "cluster", "data", "stages", "training", "phases", "pipeline", "sweep"},
    "cli": {"config", "io", "cluster", "stages", "phases", "pipeline", "plan", "sweep", "study"},
    "jobs": {"cli"},
    "tune": {"sweep"},
}


def test_each_room_imports_only_the_rooms_below_it():
    graph = _graph()
    assert {_room(m) for m in graph} - {PKG} == set(LAYERS), "a room without a layer: add it to LAYERS and the docs"
    bad = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                 if _room(a) != _room(b) and _room(b) not in LAYERS.get(_room(a), set()))
    assert not bad, bad


def test_rooms_form_no_cycle():
    assert find_cycle({room: set(deps) for room, deps in LAYERS.items()}) is None


def test_losses_import_only_torch_numpy_stdlib_and_losses():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        if not name.startswith(f"{PKG}.losses"):
            continue
        for target in _imports(name, path, set(mods)):
            top = target.split(".")[0]
            ok = (target.startswith(f"{PKG}.losses") or top in ("torch", "numpy")
                  or top in sys.stdlib_module_names or top == "__future__")
            if not ok:
                bad.append(f"{name} imports {target}")
    assert not bad, bad


BOTTOM = {"wmss_ray.cluster", "wmss_ray.io", "wmss_ray.io.storage", "wmss_ray.io.errors", "wmss_ray.config",
          "wmss_ray.config.schema",
          "wmss_ray.config.sections", "wmss_ray.config.training_sections"}


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_bottom_layer_modules_import_no_phase_module(module):
    deps = _graph()[module]
    assert deps <= BOTTOM, deps


def test_ray_init_has_one_call_site():
    sites = []
    for name, path in _modules().items():
        for node in ast.walk(_parsed(path)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
                sites.append(f"{name}:{node.lineno}")
    assert len(sites) == 1 and sites[0].startswith("wmss_ray.cluster:"), sites


def test_jobs_and_tune_are_not_installed_packages(tmp_path):
    """``jobs/`` and ``tune/`` are thin entrypoints run from the repository root; installed, the
    project provides ``wmss_ray`` only (PyPI has a package called ``tune``)."""
    import os
    import subprocess

    code = ("import importlib.util as u; "
            "print([n for n in ('tune', 'jobs', 'wmss_ray') if u.find_spec(n) is not None])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['wmss_ray']"
