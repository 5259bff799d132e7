"""The environment under test is the locked one (requirements.lock): a drift fails here, naming
each package, before it shows up as a strange failure elsewhere (transformers 5.25 pulling in
``kernels`` broke ZeRO-3 for every fresh install while the ranges in pyproject.toml allowed it)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
#: Set to 0 to run the suite in an environment of your own on purpose (then it is not the tested set).
OPT_OUT = "WMSS_LOCK_CHECK"


def normalize_name(name: str) -> str:
    """A distribution's name as PEP 503 compares them (``Pydantic_Core`` -> ``pydantic-core``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{n}: not a 'name==version' pin: {line!r}")
        pins[normalize_name(name.strip())] = version.strip()
    return pins


def installed_differences(pins: dict[str, str]) -> list[str]:
    """One line per locked package that is missing or at another version (a local build tag such
    as ``+cpu`` or ``+cu128`` of the locked version counts as that version)."""
    out = []
    for name, want in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: locked {want}, not installed")
            continue
        if have.split("+", 1)[0] != want.split("+", 1)[0]:
            out.append(f"{name}: locked {want}, installed {have}")
    return out


def test_the_lock_pins_every_dependency_once():
    pins = read_lock()
    for required in ("ray", "torch", "transformers", "deepspeed", "pydantic", "pytest"):
        assert required in pins, f"{LOCK.name} does not pin {required}"
    assert "wmss-ray" not in pins, "the project itself is not a locked dependency"


def test_installed_versions_are_the_locked_ones():
    if os.environ.get(OPT_OUT) == "0":
        pytest.skip(f"{OPT_OUT}=0: not checking the environment against {LOCK.name}")
    diffs = installed_differences(read_lock())
    assert not diffs, (f"the environment differs from {LOCK.name} (the tested set): " + "; ".join(diffs)
                       + ". Run 'make install' to get the locked set, or 'make lock' to move the lock "
                         f"(it runs the suite on the new set); {OPT_OUT}=0 skips this check.")


def test_a_drift_is_named(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\npytest==0.0.1\nno-such-package-wmss==1.0\ntorch==%s\n"
                    % metadata.version("torch").split("+")[0])
    diffs = installed_differences(read_lock(lock))
    assert diffs == ["no-such-package-wmss: locked 1.0, not installed",
                     f"pytest: locked 0.0.1, installed {metadata.version('pytest')}"]
    lock.write_text("pytest>=8\n")
    with pytest.raises(ValueError, match="lock.txt:1"):
        read_lock(lock)
