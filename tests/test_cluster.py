"""The Ray start-up decision (``wmss_ray.cluster.plan_ray_start``), without Ray."""

from __future__ import annotations

import socket

import pytest

from wmss_ray.cluster import AuthTokenError, free_port, load_auth_token, plan_ray_start


def test_no_cluster_starts_a_local_one_with_the_runtime_env(tmp_path):
    plan = plan_ray_start({}, num_cpus=3, home=tmp_path)
    assert plan.mode == "local"
    assert plan.kwargs["num_cpus"] == 3 and "address" not in plan.kwargs
    assert plan.kwargs["runtime_env"] == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    assert "num_cpus" not in plan_ray_start({}, home=tmp_path).kwargs


def test_ray_address_joins_that_cluster_and_ignores_num_cpus(tmp_path):
    plan = plan_ray_start({"RAY_ADDRESS": "10.0.0.1:6379"}, num_cpus=3, home=tmp_path)
    assert plan.mode == "join" and plan.kwargs["address"] == "10.0.0.1:6379"
    assert "num_cpus" not in plan.kwargs
    assert plan.kwargs["runtime_env"]["env_vars"] == {"TOKENIZERS_PARALLELISM": "false"}


def test_a_jobs_driver_joins_without_replacing_the_jobs_runtime_env(tmp_path):
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {}}', "RAY_ADDRESS": "127.0.0.1:6379"}
    plan = plan_ray_start(env, num_cpus=3, home=tmp_path)
    assert plan.mode == "join-job" and plan.kwargs["address"] == "127.0.0.1:6379"
    assert "runtime_env" not in plan.kwargs and "num_cpus" not in plan.kwargs
    # A job's driver inherits its node's token: no token check there even in token mode.
    assert plan_ray_start({**env, "RAY_AUTH_MODE": "token"}, home=tmp_path).mode == "join-job"


def test_runtime_env_never_carries_the_token(tmp_path):
    env = {"RAY_ADDRESS": "h:6379", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "s3cr3t"}
    plan = plan_ray_start(env, home=tmp_path)
    assert "s3cr3t" not in repr(plan)
    assert all(not k.startswith("RAY_AUTH") for k in plan.kwargs["runtime_env"]["env_vars"])


def test_token_mode_without_a_token_fails_before_ray_with_what_to_set(tmp_path):
    with pytest.raises(AuthTokenError, match="RAY_AUTH_MODE=token but no auth token for h:6379; set RAY_AUTH_TOKEN"):
        plan_ray_start({"RAY_ADDRESS": "h:6379", "RAY_AUTH_MODE": "token"}, home=tmp_path)
    # Without token mode nothing is required.
    assert plan_ray_start({"RAY_ADDRESS": "h:6379"}, home=tmp_path).mode == "join"


def test_token_sources_in_rays_order(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "tok"
    named.write_text("from-path\n")
    assert load_auth_token({}, home=tmp_path) == "from-home"
    assert load_auth_token({"RAY_AUTH_TOKEN_PATH": str(named)}, home=tmp_path) == "from-path"
    assert load_auth_token({"RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(named)}, home=tmp_path) == "env"
    assert load_auth_token({}, home=tmp_path / "nobody") is None
    plan = plan_ray_start({"RAY_ADDRESS": "h:6379", "RAY_AUTH_MODE": "token"}, home=tmp_path)
    assert plan.mode == "join"


def test_a_named_token_file_that_cannot_be_read_is_an_error(tmp_path):
    with pytest.raises(AuthTokenError, match="cannot be read"):
        load_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(AuthTokenError, match="is empty"):
        load_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home=tmp_path)


def test_an_explicit_address_joins_and_never_starts_a_cluster(tmp_path):
    plan = plan_ray_start({}, num_cpus=2, home=tmp_path, address="auto")
    assert plan.mode == "join" and plan.kwargs["address"] == "auto" and "num_cpus" not in plan.kwargs
    job = plan_ray_start({"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, home=tmp_path, address="auto")
    assert job.mode == "join-job" and "runtime_env" not in job.kwargs


def test_an_address_that_does_not_answer_is_one_line_naming_it(monkeypatch, tmp_path):
    """``ray.init`` raises ConnectionError when nothing answers at the address: it becomes a
    :class:`RayUnreachableError` (a user error: exit 2, no traceback) naming the address."""
    import ray

    from wmss_ray.cluster import RayUnreachableError, ensure_ray
    from wmss_ray.io.errors import UserError

    def no_cluster(**kwargs):
        raise ConnectionError("Could not connect to 10.9.9.9:6379\nmore text")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(RayUnreachableError) as err:
        ensure_ray(address="10.9.9.9:6379")
    assert isinstance(err.value, UserError) and isinstance(err.value, ConnectionError)
    assert "no Ray cluster answers at '10.9.9.9:6379' (Could not connect to 10.9.9.9:6379)" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("host", ["127.0.0.1", ""])
def test_free_port_gives_a_port_that_can_then_be_listened_on(host):
    port = free_port(host)
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind((host, port))
        s.listen()
