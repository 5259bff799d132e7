"""The KubeRay manifests in k8s/: rendered offline, validated strictly, checked for house rules.

Every kustomization under k8s/ is rendered with tests/k8s/render.py and each object is validated
against its schema with unknown fields rejected (KubeRay v1.7 CRDs for RayJob/RayCluster,
kubernetes-validate for core kinds), then against the operator's own rules and ours: pinned Ray
version, non-root containers with limits, token auth from a Secret reference, no exposed
dashboard, shared storage, and entrypoints/configs that exist and parse.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s import render as kr
from tests.k8s import validate as kv

REPO = kv.REPO
K8S = REPO / "k8s"
TARGETS = sorted(str(p.parent.relative_to(REPO)) for p in K8S.rglob("kustomization.yaml"))
IMAGE_REPO = "ghcr.io/wmss-ray/wmss-ray"
APP_DIR = "/app"  # the Dockerfile's WORKDIR: the repo's files live under it in the image
SECRET_NAME, SECRET_KEY = "wmss-ray-auth", "auth_token"
SHARED_PVC, SHARED_MOUNT = "wmss-shared", "/mnt/wmss"
SENSITIVE = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "KEY", "APIKEY"}
SECRET_LOOKING = re.compile(r"(?i)bearer\s+\S|\b[0-9a-f]{32,}\b")
GPU_TARGETS = [t for t in TARGETS if t.startswith("k8s/overlays/gpu")]
# /dev/shm left over after Ray's object store: NCCL's shared-memory segments on a GPU pod
# (8 local ranks), torch/gloo on a CPU one
SHM_RESERVE = {"gpu": 8 * 2**30, "cpu": 256 * 2**20}
STAGING_MOUNT = "/mnt/staging"
RDMA_PLUGINS = ("rdma/", "nvidia.com/hostdev")  # k8s-rdma-shared-dev-plugin, SR-IOV host-device
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}


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


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {t: kr.render(REPO / t) for t in TARGETS}


def _ray_objects(objs):
    return [o for o in objs if o["apiVersion"] == "ray.io/v1"]


def _bytes(quantity: str | int) -> int:
    """A Kubernetes quantity in binary units ("64Gi", "512Mi") or plain bytes, as an int."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|)", str(quantity))
    assert m, f"quantity {quantity!r}: use binary units (Ki, Mi, Gi, Ti) or bytes"
    return int(m.group(1)) * UNITS[m.group(2)]


def _gpus(container: dict) -> int:
    return int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def _rdma(container: dict) -> dict[str, int]:
    limits = (container.get("resources") or {}).get("limits") or {}
    return {k: v for k, v in limits.items() if k.startswith(RDMA_PLUGINS)}


def _ray_groups(obj: dict):
    """(role, group) for the head group and every worker group of a RayJob/RayCluster."""
    for spec in kv.cluster_specs(obj):
        yield "head", spec["headGroupSpec"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"worker:{group['groupName']}", group


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

    for obj in _ray_objects(rendered[target]):
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
                allowed = {"IPC_LOCK"} if _gpus(c) else set()
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
    for obj in _ray_objects(rendered[target]):
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
    if not _ray_objects(objs):
        return
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    assert SHARED_PVC in pvcs
    for obj in _ray_objects(objs):
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
def test_object_store_fits_in_dev_shm(rendered, target):
    """Every Ray head/worker mounts a memory-backed /dev/shm and sizes Ray's object store inside it
    with room to spare: a store larger than /dev/shm silently moves to /tmp on disk, one that fills
    it leaves NCCL no room for its segments."""
    for obj in _ray_objects(rendered[target]):
        for role, group in _ray_groups(obj):
            where = f"{obj['metadata']['name']} {role}"
            pod, ray_container = group["template"]["spec"], group["template"]["spec"]["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts") or []}
            assert "/dev/shm" in mounts, f"{where}: /dev/shm not mounted (the runtime's default is 64Mi)"
            shm = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]].get("emptyDir") or {}
            assert shm.get("medium") == "Memory" and "sizeLimit" in shm, f"{where}: /dev/shm {shm}"
            size = _bytes(shm["sizeLimit"])
            assert size < _bytes(ray_container["resources"]["limits"]["memory"]), f"{where}: counts in memory"
            store = (group.get("rayStartParams") or {}).get("object-store-memory")
            assert store is not None, f"{where}: rayStartParams.object-store-memory not set"
            reserve = SHM_RESERVE["gpu" if _gpus(ray_container) else "cpu"]
            assert int(store) + reserve <= size, f"{where}: object store {store} + {reserve} > /dev/shm {size}"


def _gpu_containers(objs) -> list[tuple[str, dict, dict]]:
    return [(f"{o['metadata']['name']} {role} {c['name']}", t["spec"], c)
            for o in objs for role, t in kv.pod_templates(o) for c in kv.containers(t) if _gpus(c)]


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_containers_set_what_nccl_needs(rendered, target):
    """Each GPU container: NCCL pinned to eth0 (exact match), IB on only with an RDMA device,
    warnings-only logging, IPC_LOCK as the one added capability, a disk-backed staging volume."""
    found = _gpu_containers(rendered[target])
    assert found, f"{target}: no GPU container"
    for where, pod, c in found:
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        assert env.get("NCCL_SOCKET_IFNAME") == "=eth0", f"{where}: NCCL_SOCKET_IFNAME {env.get('NCCL_SOCKET_IFNAME')}"
        assert env.get("GLOO_SOCKET_IFNAME") == "eth0", where
        assert env.get("NCCL_DEBUG") == "WARN", where
        assert env.get("NCCL_IB_DISABLE") == ("0" if _rdma(c) else "1"), f"{where}: NCCL_IB_DISABLE without/with RDMA"
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}, where
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        assert STAGING_MOUNT in mounts, f"{where}: {STAGING_MOUNT} not mounted"
        staging = {v["name"]: v for v in pod["volumes"]}[mounts[STAGING_MOUNT]].get("emptyDir")
        assert staging and "medium" not in staging and _bytes(staging["sizeLimit"]) >= 48 * 10**9, where


def test_rdma_overlay_requests_a_device_and_enables_ib(rendered):
    """gpu-rdma is the gpu overlay plus one RDMA device per worker and NCCL over IB verbs, and
    nothing else: the whole RayJob equals gpu's once the name, device and IB variables are undone."""
    import copy

    job = next(o for o in rendered["k8s/overlays/gpu-rdma"] if o["kind"] == "RayJob")
    tcp = next(o for o in rendered["k8s/overlays/gpu"] if o["kind"] == "RayJob")
    (_, _, c), = _gpu_containers([job])
    rdma = _rdma(c)
    assert rdma and all(int(v) >= 1 for v in rdma.values()), c["resources"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_IB_DISABLE"] == "0" and env.get("NCCL_IB_HCA") and env.get("NCCL_NET_GDR_LEVEL"), env
    undone = copy.deepcopy(job)
    undone["metadata"]["name"] = tcp["metadata"]["name"]
    (_, _, u), = _gpu_containers([undone])
    for kind in ("requests", "limits"):
        u["resources"][kind] = {k: v for k, v in u["resources"][kind].items() if k not in rdma}
    u["env"] = [dict(e, value="1") if e["name"] == "NCCL_IB_DISABLE" else e for e in u["env"]
                if e["name"] not in ("NCCL_IB_HCA", "NCCL_NET_GDR_LEVEL")]
    assert undone == tcp


def _entrypoint(job: dict) -> tuple[str, list[str]]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"entrypoint {argv}"
    return argv[2], argv[3:]


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoints_exist_and_parse(rendered, target):
    from wmss_ray.config.loading import load_config

    for job in (o for o in rendered[target] if o["kind"] == "RayJob"):
        module, args = _entrypoint(job)
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


def test_gpu_overlay_shape(rendered):
    job = next(o for o in rendered["k8s/overlays/gpu"] if o["kind"] == "RayJob")
    module, args = _entrypoint(job)
    assert module == "jobs.pipeline" and f"{APP_DIR}/configs/qwen3-4b-math.yaml" in args
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) == 1 and groups[0]["replicas"] == groups[0]["minReplicas"] == groups[0]["maxReplicas"] == 2
    pod = groups[0]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_pool_overlay_gives_the_weak_pool_its_own_gpus(rendered):
    from wmss_ray.config.loading import load_config

    job = next(o for o in rendered["k8s/overlays/gpu-pool"] if o["kind"] == "RayJob")
    _, args = _entrypoint(job)
    ns = importlib.import_module("jobs.pipeline").build_parser().parse_args(args)
    cfg = load_config(REPO / ns.config[len(APP_DIR) + 1:], ns.overrides)
    assert cfg.mix.placement == "pool" and cfg.mix.mode == "frozen"
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = group["replicas"] * group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    p, sc = cfg.mix.pool, cfg.scaling
    assert p.gpus_per_actor > 0 and sc.num_workers * sc.gpus_per_worker + p.replicas * p.shards * p.gpus_per_actor == gpus


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
