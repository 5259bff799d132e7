"""Strict validation of rendered manifests.

- ``ray.io/v1`` RayJob / RayCluster: the KubeRay v1.7 CRD schemas in ``../shared/kuberay/crds/``,
  made strict the way the API server behaves with ``--validate=strict`` (recipe in that folder's
  README): unknown fields rejected, defaults applied before ``required``, ``nullable`` honoured.
- Core kinds (PersistentVolumeClaim, ServiceAccount, Service, ...): ``kubernetes-validate``'s
  strict schemas, offline, for the newest Kubernetes version it ships.
- ``operator_errors``: the checks KubeRay's operator does that the schema does not encode.

Any kind without a schema is an error, never a silent pass.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR_CANDIDATES = (REPO.parent / "shared" / "kuberay" / "crds", REPO / "shared" / "kuberay" / "crds")
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
NAME_LIMITS = {"RayJob": 47, "RayCluster": 53}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def crd_dir() -> Path | None:
    return next((d for d in CRD_DIR_CANDIDATES if (d / CRD_FILES["RayJob"]).is_file()), None)


def strict(node: Any) -> Any:
    """The README's recipe: additionalProperties false, defaulted fields not required, nullable."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: ({p: strict(s) for p, s in v.items()} if k == "properties" else strict(v)) for k, v in node.items()}
    if "properties" in out:
        required = [r for r in out.pop("required", []) if "default" not in out["properties"].get(r, {})]
        if required:
            out["required"] = required
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """Loading a CRD takes ~0.5-1 s: cached for the whole session."""
    directory = crd_dir()
    if directory is None:
        raise FileNotFoundError(f"KubeRay CRDs not found; looked in {[str(d) for d in CRD_DIR_CANDIDATES]}")
    with open(directory / CRD_FILES[kind]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))


def k8s_version() -> str:
    import kubernetes_validate

    return kubernetes_validate.latest_version()


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one object, as 'path: message' lines."""
    kind, api = obj.get("kind"), obj.get("apiVersion")
    if api == "ray.io/v1" and kind in CRD_FILES:
        errors = [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in crd_validator(kind).iter_errors(obj)
        ]
        name = obj.get("metadata", {}).get("name", "")
        if not DNS1035.match(name) or len(name) > NAME_LIMITS[kind]:
            errors.append(f"metadata/name: {name!r} must be a DNS-1035 label of at most {NAME_LIMITS[kind]} characters")
        return errors
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {api} {kind}: add its schema or do not ship it"]
    return []


# ----------------------------------------------------------------------------- structure walkers


def cluster_specs(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The RayClusterSpec(s) inside a RayJob or RayCluster."""
    if obj.get("kind") == "RayCluster":
        yield obj["spec"]
    elif obj.get("kind") == "RayJob" and obj["spec"].get("rayClusterSpec"):
        yield obj["spec"]["rayClusterSpec"]


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, PodTemplateSpec) for every pod a manifest will create: head, workers, submitter."""
    for spec in cluster_specs(obj):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"worker:{group['groupName']}", group["template"]
    if obj.get("kind") == "RayJob" and obj["spec"].get("submitterPodTemplate"):
        yield "submitter", obj["spec"]["submitterPodTemplate"]
    if obj.get("kind") == "Pod":
        yield "pod", {"spec": obj["spec"]}
    if obj.get("kind") in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        yield obj["kind"].lower(), obj["spec"]["template"]


def containers(template: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = template.get("spec", {})
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


# ----------------------------------------------------------------------------- operator rules


def operator_errors(obj: dict[str, Any]) -> list[str]:
    """KubeRay operator checks that the CRD schema does not encode (crds/README.md)."""
    errors: list[str] = []
    if obj.get("kind") == "RayJob":
        spec = obj["spec"]
        if "activeDeadlineSeconds" in spec and not spec["activeDeadlineSeconds"] > 0:
            errors.append("spec.activeDeadlineSeconds must be > 0")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("spec.backoffLimit must be >= 0")
        sub = (spec.get("submitterConfig") or {}).get("backoffLimit", 0)
        if sub < 0:
            errors.append("spec.submitterConfig.backoffLimit must be >= 0")
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if ttl < 0:
            errors.append("spec.ttlSecondsAfterFinished must be >= 0")
        if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.ttlSecondsAfterFinished > 0 needs spec.shutdownAfterJobFinishes: true")
        if "runtimeEnvYAML" in spec:
            try:
                env = yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as err:
                errors.append(f"spec.runtimeEnvYAML does not parse: {err}")
            else:
                if not isinstance(env, dict):
                    errors.append("spec.runtimeEnvYAML must be a YAML mapping")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append("a RayJob needs rayClusterSpec or clusterSelector")
    for cspec in cluster_specs(obj):
        for group in cspec.get("workerGroupSpecs") or []:
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if lo > hi:
                errors.append(f"worker group {group['groupName']}: minReplicas {lo} > maxReplicas {hi}")
            if "replicas" in group and not lo <= group["replicas"] <= hi:
                errors.append(f"worker group {group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    return errors
