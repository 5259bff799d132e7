"""Real Ray job submission against a real local head with token authentication.

One head (tests/cli/local_head.py, the session fixture ``ray_head``): ``ray start --head --block`` with
RAY_AUTH_MODE=token and a generated token in a temp file, its own temp dir and ports, stopped by
pid in a finally. Jobs are submitted through wmss_ray.cli.submit with the repo as working_dir.

- the mechanics, always: ``python -m jobs.check_cluster`` (connects with address="auto", runs
  tasks, writes files through every node and a JSON summary) must SUCCEED and leave its outputs;
- requests without the token (or with a wrong one) are refused: 401/403, AuthError;
- the shrunken demo pipeline (configs/test-tiny.yaml) end to end, as ``wmss submit`` sends it
  (the session fixture ``tiny_job_run``, whose run directory tests/test_pipeline_e2e.py checks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests

from tests.cli.local_head import finish_job
from wmss_ray.cli import submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


@pytest.fixture
def head(ray_head):
    return ray_head


@pytest.fixture
def with_token(head, monkeypatch):
    """The client side: the token from a file, as a user would point RAY_AUTH_TOKEN_PATH at it."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    return head


def test_check_cluster_job_succeeds_with_token(with_token, tmp_path):
    head = with_token
    out, storage = tmp_path / "check.json", tmp_path / "shared"
    job_id = submit.submit_entrypoint(
        f"python -m jobs.check_cluster --out {out} --storage {storage} --tasks 3",
        head.dashboard_url, runtime_env=submit.default_runtime_env(),
    )
    status, logs = finish_job(job_id, head, timeout_s=180)
    assert status == "SUCCEEDED", logs[-6000:]
    assert submit.job_status(job_id, head.dashboard_url) == "SUCCEEDED"

    summary = json.loads(out.read_text())
    assert summary["ok"] is True and summary["tasks"] == {"count": 3, "ok": True, "hosts": summary["tasks"]["hosts"]}
    assert summary["cluster_resources"]["CPU"] == head.num_cpus
    assert summary["token_auth"] is True and summary["alive_nodes"] == 1
    assert summary["storage"]["ok"] is True and summary["storage"]["nodes_written"] == 1
    # the drain request (the worker pods' preStop path) goes through with the token auth on
    assert summary["preemption"]["drain_api"] == {"reachable": True, "accepted": True}
    assert '"ok": true' in logs  # the summary is in the job's logs too
    assert head.token not in logs and head.token not in out.read_text()


def test_requests_without_the_token_are_refused(head, monkeypatch, tmp_path):
    jobs_api = f"{head.dashboard_url}/api/jobs/"
    assert requests.get(jobs_api, timeout=10).status_code == 401
    assert requests.get(jobs_api, timeout=10, headers={"Authorization": "Bearer " + "0" * 64}).status_code == 403
    assert requests.get(jobs_api, timeout=10, headers={"Authorization": f"Bearer {head.token}"}).status_code == 200

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    with pytest.raises(submit.AuthError) as missing:
        submit.job_status("raysubmit_none", head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    with pytest.raises(submit.AuthError) as wrong:
        submit.submit_entrypoint("echo never-runs", head.dashboard_url)
    for err in (missing.value, wrong.value):
        assert "token missing or wrong; set RAY_AUTH_TOKEN" in str(err)
        assert head.token not in str(err)
    assert "403" in str(wrong.value)


@pytest.mark.slow
def test_tiny_pipeline_as_a_ray_job(tiny_job_run):
    """The session's tiny pipeline run (tests/conftest.py::tiny_job_run) is a real job: submitted
    with the token, it ran every phase inside the job and left a completed run directory.
    What the run must contain is checked in tests/test_pipeline_e2e.py."""
    from wmss_ray.io.manifest import read_manifest
    from wmss_ray.pipeline import build_phases

    run = tiny_job_run
    assert run.status == "SUCCEEDED", run.logs[-8000:]
    # what `wmss submit` sends: the config by its path inside the uploaded working_dir
    assert "python -m jobs.pipeline --config configs/test-tiny.yaml --set run.storage=" in run.logs
    run_dir = Path(run.cfg.run_dir())
    assert (run_dir / "config.yaml").is_file()
    for phase in build_phases(run.cfg):
        man = read_manifest(run_dir / phase.name)
        assert man is not None and man.status == "completed", f"phase {phase.name}: {man}"
        # it ran in this job (not skipped): the job printed its start and end
        assert f"[wmss] {phase.name} started" in run.logs and f"[wmss] {phase.name} done in" in run.logs
    # issue 30 item 1: the job's log (what `ray job logs` shows) reads like a log of the run; Ray's,
    # Ray Train's and Ray Data's output went to <run>/logs/, and nothing repaints in it
    lines = [line for line in run.logs.splitlines() if line.strip()]
    assert len(lines) <= 60, "\n".join(lines)
    assert "\r" not in run.logs and "Reporting training result" not in run.logs
    # no worker or task output Ray forwarded to the driver, late lines included: the job
    # disconnects from Ray before it restores its stdout (cli/output.run_console)
    assert not [line for line in lines if re.search(r"\(\S+ pid=\d+\)", line)], "\n".join(lines)
    (log,) = (run_dir / "logs").glob("driver-*.log")
    text = log.read_text()
    assert "[wmss] sft started" in text and "streaming_executor" in text  # ours and Ray Data's
