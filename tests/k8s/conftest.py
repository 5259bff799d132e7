"""The rendered manifests, per test module (tests/k8s/render.py: every kustomization under k8s/)."""

from __future__ import annotations

import pytest

from tests.k8s import render as kr
from tests.k8s.manifests import REPO, TARGETS


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {t: kr.render(REPO / t) for t in TARGETS}
