"""What the KubeRay manifests' pods get (rendered as in tests/k8s/test_manifests.py): a memory-backed
/dev/shm with Ray's object store inside it, the GPU containers' NCCL environment and disk-backed
checkpoint staging, the RDMA overlay's device and InfiniBand settings, and the GPU overlays'
shapes (the 4B recipe on 2 x 8 GPUs; the weak pool's GPUs next to the Train workers')."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.k8s import validate as kv
from tests.k8s.manifests import APP_DIR, GPU_TARGETS, REPO, TARGETS, entrypoint, gpu_count, ray_objects

# /dev/shm left over after Ray's object store: NCCL's shared-memory segments on a GPU pod
# (8 local ranks), torch/gloo on a CPU one
SHM_RESERVE = {"gpu": 8 * 2**30, "cpu": 256 * 2**20}
STAGING_MOUNT = "/mnt/staging"
RDMA_PLUGINS = ("rdma/", "nvidia.com/hostdev")  # k8s-rdma-shared-dev-plugin, SR-IOV host-device
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}


def _bytes(quantity: str | int) -> int:
    """A Kubernetes quantity in binary units ("64Gi", "512Mi") or plain bytes, as an int."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|)", str(quantity))
    assert m, f"quantity {quantity!r}: use binary units (Ki, Mi, Gi, Ti) or bytes"
    return int(m.group(1)) * UNITS[m.group(2)]


def _rdma(container: dict) -> dict[str, int]:
    limits = (container.get("resources") or {}).get("limits") or {}
    return {k: v for k, v in limits.items() if k.startswith(RDMA_PLUGINS)}


def _ray_groups(obj: dict):
    """(role, group) for the head group and every worker group of a RayJob/RayCluster."""
    for spec in kv.cluster_specs(obj):
        yield "head", spec["headGroupSpec"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"worker:{group['groupName']}", group


def _gpu_containers(objs) -> list[tuple[str, dict, dict]]:
    return [(f"{o['metadata']['name']} {role} {c['name']}", t["spec"], c)
            for o in objs for role, t in kv.pod_templates(o) for c in kv.containers(t) if gpu_count(c)]


@pytest.mark.parametrize("target", TARGETS)
def test_object_store_fits_in_dev_shm(rendered, target):
    """Every Ray head/worker mounts a memory-backed /dev/shm and sizes Ray's object store inside it
    with room to spare: a store larger than /dev/shm silently moves to /tmp on disk, one that fills
    it leaves NCCL no room for its segments."""
    for obj in ray_objects(rendered[target]):
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
            reserve = SHM_RESERVE["gpu" if gpu_count(ray_container) else "cpu"]
            assert int(store) + reserve <= size, f"{where}: object store {store} + {reserve} > /dev/shm {size}"


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


def test_gpu_overlay_shape(rendered):
    job = next(o for o in rendered["k8s/overlays/gpu"] if o["kind"] == "RayJob")
    module, args = entrypoint(job)
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
    _, args = entrypoint(job)
    ns = importlib.import_module("jobs.pipeline").build_parser().parse_args(args)
    cfg = load_config(REPO / ns.config[len(APP_DIR) + 1:], ns.overrides)
    assert cfg.mix.placement == "pool" and cfg.mix.mode == "frozen"
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = group["replicas"] * group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    p, sc = cfg.mix.pool, cfg.scaling
    assert p.gpus_per_actor > 0 and sc.num_workers * sc.gpus_per_worker + p.replicas * p.shards * p.gpus_per_actor == gpus
