"""``wmss_ray.cli.check_cluster``'s storage check on the in-process Ray cluster: a shared directory and an
object-store URI (moto on 127.0.0.1) are written from every node and read back; a store a node
cannot write is named per node and fails the check; an unknown scheme fails before any task.
Its preemption check: the Train API, a dry drain request through the GCS, each node's grace period.
(The whole job, submitted with the token, is in test_submit_real.py.)"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def _alive_nodes(ray):
    return [n for n in ray.nodes() if n.get("Alive")]


def test_a_local_shared_directory_is_written_from_every_node_and_cleaned(ray_cluster, tmp_path):
    from wmss_ray.cli.check_cluster import check_storage

    got = check_storage(str(tmp_path), _alive_nodes(ray_cluster))
    assert got == {"dir": str(tmp_path), "nodes_written": 1, "visible_to_driver": 1, "errors": {}, "ok": True}
    assert list((tmp_path / ".wmss-check").iterdir()) == []  # this check's files are gone


def test_an_object_store_uri_goes_to_the_store_not_a_local_folder(ray_cluster, s3_server, tmp_path, monkeypatch):
    import boto3

    from wmss_ray.cli.check_cluster import check_storage

    monkeypatch.chdir(tmp_path)  # the driver's reading a mistaken local "s3:/..." would look here
    uri = f"s3://{s3_server['bucket']}/check"
    got = check_storage(uri, _alive_nodes(ray_cluster))
    assert got["ok"] is True and got["visible_to_driver"] == 1 and got["errors"] == {} and got["dir"] == uri
    assert list(tmp_path.iterdir()) == []
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_server["bucket"], Prefix="check/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    # the nodes wrote into the bucket (its directory entries stay) and the markers were deleted
    assert "check/.wmss-check/" in keys and not [k for k in keys if not k.endswith("/")], keys


def test_a_store_the_nodes_cannot_write_is_named_per_node(ray_cluster, s3_server):
    from wmss_ray.cli.check_cluster import check_storage

    nodes = _alive_nodes(ray_cluster)
    got = check_storage("s3://no-such-bucket-wmss/check", nodes)
    assert got["ok"] is False and got["nodes_written"] == 0 and got["visible_to_driver"] == 0
    assert set(got["errors"]) == {n["NodeID"] for n in nodes} and all(got["errors"].values())


def test_an_unknown_scheme_fails_before_any_task(ray_cluster):
    from wmss_ray.cli.check_cluster import check_storage

    with pytest.raises(ValueError, match="scheme 'ftp' is not a pyarrow filesystem"):
        check_storage("ftp://host/runs", _alive_nodes(ray_cluster))


def test_the_preemption_signal_is_reported_without_draining_a_node(ray_cluster):
    """The Train API is there and the GCS takes a drain request from the job (a dry probe for a
    node id that does not exist); outside Kubernetes no node declares a grace period: a warning."""
    from wmss_ray.cli.check_cluster import check_preemption

    nodes = _alive_nodes(ray_cluster)
    got = check_preemption(nodes)
    assert got["ok"] is True and got["train_api"] is True
    assert got["drain_api"] == {"reachable": True, "accepted": True}
    assert sorted(n["node_id"] for n in got["nodes"]) == sorted(n["NodeID"] for n in nodes)
    assert all(n["grace_s"] is None and n["sigterm_drain_s"] > 0 for n in got["nodes"])
    assert len(got["warnings"]) == len(nodes) and "WMSS_TERMINATION_GRACE_S" in got["warnings"][0]
    # nothing was drained: the node still takes new work (a drained one would leave this pending)
    assert ray_cluster.get(ray_cluster.remote(num_cpus=0.1)(lambda: 1).remote(), timeout=120) == 1


def test_a_pod_reports_its_grace_period_and_sigterm_drain(ray_cluster, monkeypatch):
    from wmss_ray.cli.check_cluster import _node_grace

    monkeypatch.setenv("WMSS_TERMINATION_GRACE_S", "600")
    monkeypatch.setenv("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "30")
    got = _node_grace()
    assert got["grace_s"] == 600.0 and got["sigterm_drain_s"] == 30.0


def test_a_drain_path_that_does_not_work_fails_the_check_naming_why(ray_cluster, monkeypatch):
    import ray

    from wmss_ray.cli.check_cluster import check_preemption

    class Refused:
        def __init__(self, address):
            raise ConnectionError(f"UNAUTHENTICATED: token rejected by {address}")

    monkeypatch.setattr(ray._raylet, "GcsClient", Refused)
    got = check_preemption(_alive_nodes(ray_cluster))
    assert got["ok"] is False and got["drain_api"]["reachable"] is False
    assert got["drain_api"]["error"].startswith("ConnectionError: UNAUTHENTICATED: token rejected")
