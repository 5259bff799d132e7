"""The GPU check on a lent device machine: the wheels it carries and the calls that run it.

A device machine (the project's ``device`` tool) is bare and offline: its image holds CUDA
PyTorch and a fixed set of packages (:data:`DEVICE_IMAGE`), not Ray, DeepSpeed or pydantic, and
its device time is short (15 minutes a session, 10 a call, a start costing one or two). So the
check's run there is prepared here, once, and tested here: :data:`CARRIED` names what the check
needs beyond the image, at the lock's versions (the lock's transformers too, not the image's
older one: the run must test what users install), and the test suite runs the CPU smoke of the
check with every other package hidden (:func:`hide_all_but`), so a missing wheel fails here, not
on the device. Usage, here::

    python benchmarks/device_kit.py wheels     # the carried wheels into .whl/ (cp312, x86-64)
    python benchmarks/device_kit.py calls      # the device calls to make, each with its carry
    python benchmarks/device_kit.py as-device benchmarks/gpu_check.py --dry-run   # seeing only what is there

There, each call runs ``bash benchmarks/gpu_check_device.sh PARTS BUDGET_S``: it installs the
wheels, prints the versions, and runs ``gpu_check.py`` into ``$OUT`` (the report, its JSON, the
profiles and the log come back).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_lock import normalize_name, read_lock  # noqa: E402  (the lock's one reader)

WHEELS = ".whl"  # in the repository root, ignored by git (.gitignore), named in each call's carry

#: The distributions of the device machines' image ('cuda'), as the tool's KINDS.md lists them
#: (read 2026-11-17; Python 3.12, torch 2.11.0+cu130, transformers 5.17.0, no Ray, DeepSpeed, pydantic).
DEVICE_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pyre-extensions pygments pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentence-transformers sentencepiece
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

#: What the check needs beyond the image, carried as wheels at the lock's versions. DeepSpeed
#: publishes only a source archive: its wheel is built here, pure Python (ops JIT-compiled there).
CARRIED = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "transformers")

#: The device machine's Python and platforms, for ``pip download`` (manylinux tags matched exactly).
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

#: The device tool's limits (its README): 10 minutes a call, 15 a session, a start ~1-2 minutes,
#: at most 8 files back per call, 2,000 characters a command, 8 carried paths, 64 MiB travelling.
CALL_LIMIT_S, SESSION_S, START_S = 600, 900, 120
MAX_FILES_BACK, MAX_COMMAND, MAX_CARRY_MIB = 8, 2000, 64

#: The first call of a device session: (parts, the check's --budget-s, the call's timeout_s). It
#: holds what answers the open questions (the step matrix against the plain loop, the 4B shape's
#: speed and memory, the loss kernel, packed attention), filled by the check's own estimates
#: (gpu_check.GPU_SECONDS, ~540 s with the models' preparation); the timeout leaves ~50 s for the
#: wheels' install, the imports and the copy back. The check writes its report after every part, so
#: a call cut at its timeout still brings back every finished part.
FIRST_CALL = ("steps,kernel,big,attention", 540, 590)
#: The second call, with whatever device time is left (``status``'s ``budget_left_s``): the parts
#: already measured once on an H200 (exactness: it fits when the machine started within about a
#: minute, else the budget skips it and says so) or cheap; on one GPU without Ray or vLLM the nccl,
#: ray and engines parts only say "skipped".
SECOND_PARTS = "exact,score_gen,nccl"
#: A call's slack beyond the check's budget: install, imports, the copy back, the tool's own start.
CALL_SLACK_S = 50


def second_call(budget_left_s: float) -> tuple[str, int, int] | None:
    """The second call's (parts, --budget-s, timeout_s) for the device time left after the first
    (None: too little left for any part of it to run)."""
    timeout = int(min(CALL_LIMIT_S, budget_left_s - 20))
    budget = timeout - CALL_SLACK_S
    return (SECOND_PARTS, budget, timeout) if budget >= 60 else None


def carried_pins() -> list[str]:
    """``name==version`` of each carried distribution, at the lock's version (one version each:
    two of one name stop the install there)."""
    pins = read_lock()
    missing = [d for d in CARRIED if normalize_name(d) not in pins]
    if missing:
        raise SystemExit(f"requirements.lock pins none of {missing}: the carried wheels follow the lock")
    return [f"{d}=={pins[normalize_name(d)]}" for d in CARRIED]


def requirements(distribution: str) -> set[str]:
    """The normalized names a distribution installed here requires (no extras; markers as here)."""
    from packaging.requirements import Requirement

    try:
        reqs = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    out = set()
    for line in reqs:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.add(normalize_name(r.name))
    return out


def with_requirements(distributions) -> set[str]:
    """These distributions and, transitively, what each requires as installed here (the image's
    packages come with their own requirements there, at its versions)."""
    seen, todo = set(), [normalize_name(d) for d in distributions]
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo.extend(requirements(d) - seen)
    return seen


def device_distributions(carried=CARRIED) -> set[str]:
    """The distributions a device machine has once ``carried`` is installed: the image's, what
    they require as installed here (there they come at the image's versions) except what is
    carried (KINDS.md: the image has no DeepSpeed or pydantic, whatever requires them here), and
    the carried ones."""
    carried = {normalize_name(d) for d in carried}
    return (with_requirements(DEVICE_IMAGE) - carried) | {normalize_name(d) for d in DEVICE_IMAGE} | carried


def module_names(distributions) -> set[str]:
    """The top-level import names of these distributions, as installed in this environment."""
    wanted = {normalize_name(d) for d in distributions}
    return {mod for mod, dists in importlib.metadata.packages_distributions().items()
            if any(normalize_name(d) in wanted for d in dists)}


class _Hidden(importlib.abc.MetaPathFinder):
    """Stands in front of the finders that search ``sys.path`` (and editable installs) and lets
    them find only the top-level modules in ``allowed`` and the standard library's: any other is
    not found at all (``import`` raises ``ModuleNotFoundError``, ``importlib.util.find_spec``
    returns None, as a library's probe for an optional package expects)."""

    def __init__(self, allowed: set[str], distributions: set[str], finders: list):
        self.allowed, self.distributions, self.finders = allowed, distributions, finders
        paths = sysconfig.get_paths()
        self.stdlib = tuple({paths["stdlib"], paths["platstdlib"]})

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in self.allowed:
            # the standard library's private modules (``_sysconfigdata_*``) are in no list
            spec = importlib.machinery.PathFinder.find_spec(top)
            if spec is None or not spec.origin or not spec.origin.startswith(self.stdlib) \
                    or "-packages" in spec.origin:
                return None
            self.allowed.add(top)
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        """The allowed distributions' metadata only (``importlib.metadata.version`` of a hidden one
        raises ``PackageNotFoundError``, as where it is not installed)."""
        for finder in self.finders:
            for dist in getattr(finder, "find_distributions", lambda _: [])(context):
                if normalize_name(dist.metadata["Name"] or "") in self.distributions:
                    yield dist


def hide_all_but(distributions, local: tuple[str, ...] = ()) -> None:
    """From now on this process imports only the standard library, the top-level modules of
    ``distributions`` (as installed here), the repository's own modules and ``local`` ones:
    any other is not found, as on a machine without it. Modules imported already stay (the
    interpreter's start-up)."""
    dists = {normalize_name(d) for d in distributions}
    allowed = set(sys.stdlib_module_names) | set(sys.builtin_module_names) | module_names(dists)
    allowed |= {m.partition(".")[0] for m in sys.modules}
    allowed |= {"wmss_ray", *local}
    allowed |= {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    builtin = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
    kept = [f for f in sys.meta_path if f in builtin]
    searching = [f for f in sys.meta_path if f not in builtin]
    sys.meta_path[:] = [*kept, _Hidden(allowed, dists, searching)]


def download_wheels(dest: Path) -> list[Path]:
    """The carried wheels into ``dest`` (emptied first): pure or cp312 manylinux x86-64 ones from
    PyPI; DeepSpeed's built here from its source archive without its ops (they compile there)."""
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = carried_pins()
    deepspeed = [p for p in pins if p.startswith("deepspeed==")]
    rest = [p for p in pins if p not in deepspeed]
    plat = [a for p in DEVICE_PLATFORMS for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
                    "--implementation", "cp", *plat, "-d", str(dest), *rest], check=True)
    # --no-build-isolation: its setup.py imports torch (this environment's); no op is prebuilt
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), *deepspeed],
                   check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    wheels = sorted(dest.glob("*.whl"))
    names = [normalize_name(w.name.split("-")[0]) for w in wheels]
    if sorted(names) != sorted(normalize_name(d) for d in CARRIED):
        raise SystemExit(f"{dest}: wheels {names}, expected one of each of {list(CARRIED)}")
    return wheels


def device_command(parts: str, budget_s: int) -> str:
    """The shell command of one device call (run in the repository root there)."""
    return f"bash benchmarks/gpu_check_device.sh {parts} {budget_s}"


def print_calls() -> None:
    parts, budget, timeout = FIRST_CALL
    print("Here, first: python benchmarks/device_kit.py wheels (the carried wheels into .whl/), then "
          "python benchmarks/device_kit.py as-device benchmarks/gpu_check.py --dry-run (the check sees only "
          "what a device machine has).")
    print(f"Device session ({SESSION_S} s of device time; a machine's start takes ~{START_S} s of it):")
    print(f"  1. run(command={device_command(parts, budget)!r}, carry=[{WHEELS!r}], timeout_s={timeout})")
    print(f"  2. status; with B = its budget_left_s, if B >= {60 + CALL_SLACK_S + 20}: run(command="
          f"'bash benchmarks/gpu_check_device.sh {SECOND_PARTS} <B - {CALL_SLACK_S + 20}>', carry=[{WHEELS!r}], "
          f"timeout_s=<B - 20>)   (device_kit.second_call(B))")
    print("  3. give_back. Each call's gpu_check.md holds the figures for BENCHMARKS.md; log.txt the console.")


def run_as_on_device(script: str, args: list[str], also: tuple[str, ...] = ()) -> None:
    """Run ``script`` with ``args`` in this process as on a device machine with the carried
    wheels: every other package hidden (``also``: top-level modules to leave visible)."""
    import runpy

    hide_all_but(device_distributions(), local=also)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["as-device"]:  # as-device [--also MODULE]... SCRIPT ARGS...: the script's args untouched
        rest, also = argv[1:], []
        while rest[:1] == ["--also"] and len(rest) > 1:
            also.append(rest[1])
            rest = rest[2:]
        if not rest:
            raise SystemExit("usage: device_kit.py as-device [--also MODULE]... SCRIPT [ARGS...]")
        run_as_on_device(rest[0], rest[1:], tuple(also))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="also: as-device [--also MODULE]... SCRIPT ARGS: run a script here "
                                       "seeing only what a device machine has")
    p.add_argument("what", choices=["wheels", "calls"])
    a = p.parse_args(argv)
    if a.what == "wheels":
        wheels = download_wheels(REPO / WHEELS)
        size = sum(w.stat().st_size for w in wheels) / 2**20
        for w in wheels:
            print(f"  {w.name} ({w.stat().st_size / 2**20:.1f} MiB)")
        print(f"{len(wheels)} wheels, {size:.1f} MiB in {REPO / WHEELS} (a call carries at most {MAX_CARRY_MIB} MiB "
              "with the working tree)")
    else:
        print_calls()
    return 0


if __name__ == "__main__":
    sys.exit(main())
