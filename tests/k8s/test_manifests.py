"""The KubeRay manifests in k8s/: rendered offline, validated strictly, checked for house rules.

Every kustomization under k8s/ is rendered with tests/k8s/render.py and each object is validated
against its schema with unknown fields rejected (KubeRay v1.7 CRDs for RayJob/RayCluster,
kubernetes-validate for core kinds), then against the operator's own rules and ours: pinned Ray
version, non-root containers with limits, token auth from a Secret reference, no exposed
dashboard, shared storage, and entrypoints/configs that exist and parse. What the pods get
(/dev/shm, GPUs, NCCL, RDMA, the GPU overlays' shapes): tests/k8s/test_resources.py.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess

import pytest
import yaml

from tests.k8s import render as kr
from tests.k8s import validate as kv
from tests.k8s.manifests import APP_DIR, REPO, TARGETS, entrypoint, gpu_count, ray_objects

IMAGE_REPO = "ghcr.io/wmss-ray/wmss-ray"
SECRET_NAME, SECRET_KEY = "wmss-ray-auth", "auth_token"
SHARED_PVC, SHARED_MOUNT = "wmss-shared", "/mnt/wmss"
SENSITIVE = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "KEY", "APIKEY"}
SECRET_LOOKING = re.compile(r"(?i)bearer\s+\S|\b[0-9a-f]{32,}\b")


def _sensitive(name: str) -> bool:
    return bool(SENSITIVE & set(re.split(r"[^A-Z0-9]+", name.upper())))


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_layout():
    assert {"k8s/base", "k8s/base/shared", "k8s/cluster", "k8s/overlays/cpu-demo", "k8s/overlays/gpu",
            "k8s/overlays/gpu-pool", "k8s/overlays/gpu-rdma"} <= set(TARGETS)
    assert kv.crd_dir() is not None, f"KubeRay CRDs missing: expected them in {kv.CRD_DIR_CANDIDATES[0]}"


@pytest.mark.parametrize("target", TARGETS)
def test_schemas_strict(rendered, target):
    objs = rendered[target]
    assert objs, f"{target} renders nothing"
    problems = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in objs for e in kv.schema_errors(o)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_operator_rules(rendered, target):
    problems = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in rendered[target] for e in kv.operator_errors(o)]
    assert not problems, "\n".join(problems)
    for job in (o for o in rendered[target] if o["kind"] == "RayJob"):
        spec = job["spec"]
        # our rules: the cluster goes away after the job, with a TTL, a deadline and bounded retries
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
        assert spec["submitterConfig"]["backoffLimit"] >= 0
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


@pytest.mark.parametrize("target", TARGETS)
def test_ray_version_is_the_pinned_one(rendered, target):
    import ray

    for obj in ray_objects(rendered[target]):
        for spec in kv.cluster_specs(obj):
            assert spec["rayVersion"] == ray.__version__, f"{obj['metadata']['name']}: rayVersion {spec['rayVersion']}"


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_non_root_with_limits(rendered, target):
    for obj in rendered[target]:
        for role, tmpl in kv.pod_templates(obj):
            pod = tmpl["spec"]
            where = f"{obj['metadata']['name']} {role}"
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            assert not any("hostPath" in v for v in pod.get("volumes") or []), where
            assert pod.get("automountServiceAccountToken") is False, f"{where}: mounts a service account token"
            assert (pod.get("securityContext") or {}).get("runAsNonRoot") is True, where
            for c in kv.containers(tmpl):
                sc = c.get("securityContext") or {}
                here = f"{where} container {c['name']}"
                assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 1000, here
                assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), here
                assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), here
                # IPC_LOCK on GPU containers only (NCCL/RDMA pin memory), nothing else anywhere
                allowed = {"IPC_LOCK"} if gpu_count(c) else set()
                assert set((sc.get("capabilities") or {}).get("add") or []) <= allowed, here
                assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", here
                res = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(kind) or {}), f"{here}: no cpu/memory {kind}"
                # extended resources (GPUs, RDMA devices) cannot be overcommitted: requests = limits
                for name in set(res.get("requests") or {}) | set(res.get("limits") or {}):
                    if "/" in name:
                        amounts = [(res.get(k) or {}).get(name) for k in ("requests", "limits")]
                        assert amounts[0] == amounts[1], f"{here}: {name} requests must equal limits"


@pytest.mark.parametrize("target", TARGETS)
def test_dashboard_not_exposed(rendered, target):
    for obj in rendered[target]:
        assert obj["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), obj["kind"]
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
        for spec in kv.cluster_specs(obj):
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP"
            assert not head.get("enableIngress")
            assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


@pytest.mark.parametrize("target", TARGETS)
def test_token_auth_from_secret_reference(rendered, target):
    assert not [o for o in rendered[target] if o["kind"] == "Secret"], "the auth Secret must not be in the repo"
    for obj in ray_objects(rendered[target]):
        for spec in kv.cluster_specs(obj):
            assert spec["authOptions"] == {"mode": "token", "secretName": SECRET_NAME}
        for role, tmpl in kv.pod_templates(obj):
            ray_container = tmpl["spec"]["containers"][0]  # KubeRay: the Ray container is the first
            env = _env(ray_container)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{role}: RAY_AUTH_MODE"
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": SECRET_NAME, "key": SECRET_KEY}, f"{role}: RAY_AUTH_TOKEN must come from the Secret"


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_literals(rendered, target):
    for obj in rendered[target]:
        for role, tmpl in kv.pod_templates(obj):
            for c in kv.containers(tmpl):
                for e in c.get("env") or []:
                    if any(s in e["name"].upper() for s in SENSITIVE):
                        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{role}: {e['name']}"
        if obj["kind"] == "RayJob" and "runtimeEnvYAML" in obj["spec"]:
            env_vars = (yaml.safe_load(obj["spec"]["runtimeEnvYAML"]) or {}).get("env_vars") or {}
            assert not [k for k in env_vars if _sensitive(k)], env_vars
        assert not [v for v in _strings(obj) if SECRET_LOOKING.search(v)], f"{obj['metadata']['name']}: literal token?"


@pytest.mark.parametrize("target", TARGETS)
def test_shared_storage_on_head_and_workers(rendered, target):
    objs = rendered[target]
    if not ray_objects(objs):
        return
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    assert SHARED_PVC in pvcs
    for obj in ray_objects(objs):
        for role, tmpl in kv.pod_templates(obj):
            if role == "submitter":
                continue
            vols = {v["name"]: v for v in tmpl["spec"].get("volumes") or []}
            mounts = {m["mountPath"]: m["name"] for m in tmpl["spec"]["containers"][0].get("volumeMounts") or []}
            assert SHARED_MOUNT in mounts, f"{role}: {SHARED_MOUNT} not mounted"
            assert vols[mounts[SHARED_MOUNT]].get("persistentVolumeClaim", {}).get("claimName") == SHARED_PVC, role
        workers = [g for s in kv.cluster_specs(obj) for g in s.get("workerGroupSpecs") or []]
        if sum(g.get("maxReplicas", 1) for g in workers) > 1:  # pods on several nodes share one volume
            assert "ReadWriteMany" in pvcs[SHARED_PVC]["spec"]["accessModes"], f"{obj['metadata']['name']}: needs RWX"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoints_exist_and_parse(rendered, target):
    from wmss_ray.config.loading import load_config

    for job in (o for o in rendered[target] if o["kind"] == "RayJob"):
        module, args = entrypoint(job)
        mod = importlib.import_module(module)  # jobs.<name> must exist in the repo
        ns = mod.build_parser().parse_args(args)
        if getattr(ns, "config", None) is None:
            continue
        assert ns.config.startswith(APP_DIR + "/"), f"--config {ns.config}: use an absolute path under {APP_DIR}"
        path = REPO / ns.config[len(APP_DIR) + 1:]
        assert path.is_file(), f"{target}: {ns.config} is referenced but {path.relative_to(REPO)} is not in the repo"
        cfg = load_config(path, ns.overrides)  # the config, with the manifest's overrides, is valid
        assert cfg.run.storage.startswith(SHARED_MOUNT + "/"), f"run.storage {cfg.run.storage} is not on {SHARED_MOUNT}"


@pytest.mark.parametrize("target", TARGETS)
def test_one_image_per_deployment(rendered, target):
    images = {
        c["image"] for o in rendered[target] for _, t in kv.pod_templates(o) for c in kv.containers(t)
    }
    if not images:
        return
    assert len(images) == 1, f"{target}: head, workers and submitter must share one image, got {images}"
    variant = "gpu" if "gpu" in target else "cpu"
    assert images == {f"{IMAGE_REPO}:{_version()}-{variant}"}


def test_long_lived_cluster_matches_the_rayjob_cluster(rendered):
    """k8s/cluster/raycluster.yaml is the base RayJob's rayClusterSpec, verbatim (no drift)."""
    job = next(o for o in rendered["k8s/base"] if o["kind"] == "RayJob")
    cluster = next(o for o in rendered["k8s/cluster"] if o["kind"] == "RayCluster")
    assert cluster["spec"] == job["spec"]["rayClusterSpec"]


def test_dockerfile_matches_manifests():
    text = (REPO / "Dockerfile").read_text()
    assert f"WORKDIR {APP_DIR}" in text
    assert "USER 1000" in text or "USER 1000:1000" in text
    assert "python:3.11-slim" in text
    assert IMAGE_REPO in text  # the build command in its header names the image the manifests use
    assert not [line for line in text.splitlines() if line.strip().startswith(("ENV", "ARG")) and _sensitive(line)]
    # the GPU variant installs flash-attn (models.attn_implementation auto), the CPU one does not
    assert "INSTALL_FLASH_ATTN=1" in text.split("AS base-gpu")[1].split("FROM ")[0]
    assert "INSTALL_FLASH_ATTN=0" in text.split("AS base-cpu")[1].split("FROM ")[0]
    assert 'pip install "flash-attn==' in text
    # its compile (the image's slowest step) builds the architectures the build arg names, Hopper among them
    assert 'FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}"' in text
    archs = re.search(r'^ARG FLASH_ATTN_CUDA_ARCHS="([0-9;]+)"$', text, flags=re.M)
    assert archs and "90" in archs.group(1).split(";"), archs
    # the image installs the tested set: every pip install but torch's and the GPU build tools is
    # constrained by the lock, and the lock is in the build context
    installs = [c for c in re.findall(r"pip install [^\\&\n]*", text) if "torch==" not in c and "ninja" not in c
                and "flash-attn" not in c]
    assert installs and all("-c requirements.lock" in c for c in installs), installs
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "!requirements.lock" in ignore
    assert {".git", ".venv", "runs"} <= {p.strip("/") for p in ignore}


# ----------------------------------------------------------------------------- the validator can fail


def test_broken_manifests_are_rejected():
    job = next(o for o in kr.render(REPO / "k8s/base") if o["kind"] == "RayJob")
    typo = kr.apply_json6902(job, [{"op": "add", "path": "/spec/entrypont", "value": "x"}])
    assert any("entrypont" in e for e in kv.schema_errors(typo))
    head = "/spec/rayClusterSpec/headGroupSpec/template/spec/containers/0"
    deep = kr.apply_json6902(job, [{"op": "add", "path": f"{head}/resurces", "value": {}}])
    assert any("resurces" in e for e in kv.schema_errors(deep))
    wrong_type = kr.apply_json6902(job, [{"op": "replace", "path": "/spec/backoffLimit", "value": "zero"}])
    assert kv.schema_errors(wrong_type)
    long_name = kr.apply_json6902(job, [{"op": "replace", "path": "/metadata/name", "value": "w" * 48}])
    assert any("DNS-1035" in e for e in kv.schema_errors(long_name))
    rules = kr.apply_json6902(job, [
        {"op": "replace", "path": "/spec/shutdownAfterJobFinishes", "value": False},
        {"op": "replace", "path": "/spec/activeDeadlineSeconds", "value": 0},
        {"op": "replace", "path": "/spec/runtimeEnvYAML", "value": "env_vars: [unclosed"},
        {"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/0/minReplicas", "value": 3},
    ])
    found = "\n".join(kv.operator_errors(rules))
    for expected in ("activeDeadlineSeconds", "shutdownAfterJobFinishes", "runtimeEnvYAML", "minReplicas 3 > max"):
        assert expected in found, found
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
           "spec": {"accesModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    assert any("accesModes" in e for e in kv.schema_errors(pvc))
    assert kv.schema_errors({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def test_renderer_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(kr.RenderError, match="unsupported"):
        kr.render(tmp_path)
    with pytest.raises(kr.RenderError, match="does not exist"):
        kr.apply_json6902({"a": {}}, [{"op": "replace", "path": "/a/b", "value": 1}])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: cross-check with kustomize skipped")
@pytest.mark.parametrize("target", TARGETS)
def test_renderer_agrees_with_kubectl_kustomize(rendered, target):
    out = subprocess.run(["kubectl", "kustomize", str(REPO / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ref = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout) if o}
    mine = {(o["kind"], o["metadata"]["name"]): o for o in rendered[target]}
    assert mine == ref
