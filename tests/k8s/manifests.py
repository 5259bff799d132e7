"""What both k8s/ test modules need of the rendered manifests: where they are, which to render,
and accessors of their RayJob / RayCluster objects and containers."""

from __future__ import annotations

import shlex

from tests.k8s import validate as kv

REPO = kv.REPO
K8S = REPO / "k8s"
TARGETS = sorted(str(p.parent.relative_to(REPO)) for p in K8S.rglob("kustomization.yaml"))
APP_DIR = "/app"  # the Dockerfile's WORKDIR: the repo's files live under it in the image
GPU_TARGETS = [t for t in TARGETS if t.startswith("k8s/overlays/gpu")]


def ray_objects(objs):
    return [o for o in objs if o["apiVersion"] == "ray.io/v1"]


def gpu_count(container: dict) -> int:
    return int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def entrypoint(job: dict) -> tuple[str, list[str]]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"entrypoint {argv}"
    return argv[2], argv[3:]
