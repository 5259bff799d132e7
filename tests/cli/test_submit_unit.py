"""wmss_ray.cli.submit without a cluster: address and token resolution, what a submission sends, CLI."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from wmss_ray.cli import submit
from wmss_ray.config.schema import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "test-tiny.yaml"
TOKEN = "a1" * 32


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_resolve_address(clean_env):
    assert submit.resolve_address() == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert submit.resolve_address() == "http://10.0.0.5:8265"
    assert submit.resolve_address("https://ray.example/") == "https://ray.example"


def test_token_sources_in_rays_order(clean_env, tmp_path):
    assert submit._load_token() is None
    home_token = tmp_path / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("home-token\n")
    assert submit._load_token() == "home-token"
    file_token = tmp_path / "tok"
    file_token.write_text(TOKEN + "\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(file_token))
    assert submit._load_token() == TOKEN
    clean_env.setenv("RAY_AUTH_TOKEN", "env-token")
    assert submit._load_token() == "env-token"


def test_named_token_file_must_be_readable(clean_env, tmp_path):
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.AuthError, match="cannot be read"):
        submit._load_token()
    (tmp_path / "empty").write_text("")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "empty"))
    with pytest.raises(submit.AuthError, match="empty"):
        submit._load_token()


def test_a_refused_request_says_how_to_pass_the_token():
    from wmss_ray.cluster import TOKEN_HELP

    class AuthenticationError(Exception):  # what Ray's job client raises, matched by name
        pass

    with pytest.raises(submit.AuthError) as err, submit._errors("http://h:8265"):
        raise AuthenticationError("Authentication failed")
    assert "HTTP 403, token wrong" in str(err.value) and TOKEN_HELP in str(err.value)


def test_config_path_inside_the_upload_or_inline(tmp_path):
    wd = tmp_path / "wd"
    for rel in ("configs/a.yaml", "runs/b.yaml", "private/c.yaml"):
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("{}")
    (wd / ".gitignore").write_text("private/\n")
    env = {"working_dir": str(wd), "excludes": ["runs/"]}
    assert submit._relative_in_upload((wd / "configs/a.yaml").resolve(), env) == "configs/a.yaml"
    assert submit._relative_in_upload((wd / "runs/b.yaml").resolve(), env) is None  # excluded
    assert submit._relative_in_upload((wd / "private/c.yaml").resolve(), env) is None  # gitignored
    assert submit._relative_in_upload(TINY, env) is None  # outside the working_dir
    assert submit._relative_in_upload(TINY, {}) is None  # nothing uploaded


@pytest.fixture
def captured(monkeypatch):
    sent: dict = {}

    def fake(command, address=None, runtime_env=None, submission_id=None, metadata=None):
        sent.update(command=command, address=address, runtime_env=runtime_env, metadata=metadata)
        return "raysubmit_fake"

    monkeypatch.setattr(submit, "submit_entrypoint", fake)
    return sent


def test_submit_job_from_the_checkout_sends_a_relative_config(clean_env, captured):
    clean_env.setenv("RAY_AUTH_TOKEN", TOKEN)
    job = submit.submit_job(TINY, "http://h:8265", overrides=["mix.lam=0.4", "run.name=x y"], entrypoint="train")
    assert job == "raysubmit_fake"
    assert captured["command"] == (
        "python -m jobs.train --config configs/test-tiny.yaml --set mix.lam=0.4 --set 'run.name=x y'")
    env = captured["runtime_env"]
    assert env["working_dir"] == str(REPO) and ".venv/" in env["excludes"] and "runs/" in env["excludes"]
    assert "WMSS_CONFIG_YAML" not in env["env_vars"]
    assert TOKEN not in repr(captured)  # the token never travels in the job's definition
    assert captured["metadata"] == {"wmss_entrypoint": "train", "wmss_config": "test-tiny.yaml", "wmss_run": "x y"}


def test_submit_job_without_upload_passes_the_config_inline(clean_env, captured, tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(TINY.read_text())
    submit.submit_job(cfg, "http://h:8265", runtime_env={"env_vars": {"A": "1"}}, extra_args=["--from-phase", "eval"])
    assert captured["command"] == "python -m jobs.pipeline --config env:WMSS_CONFIG_YAML --from-phase eval"
    assert captured["runtime_env"]["env_vars"]["WMSS_CONFIG_YAML"] == cfg.read_text()
    assert captured["runtime_env"]["env_vars"]["A"] == "1" and "working_dir" not in captured["runtime_env"]


def test_relative_run_storage_is_warned_about(clean_env, captured, caplog):
    with caplog.at_level("WARNING", logger="wmss_ray.cli.submit"):
        submit.submit_job(TINY, "http://h:8265")
    assert "run.storage 'runs' is relative" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wmss_ray.cli.submit"):
        submit.submit_job(TINY, "http://h:8265", overrides=["run.storage=/mnt/wmss/runs"])
    assert "relative" not in caplog.text


def test_bad_config_or_entrypoint_fails_before_sending(clean_env, captured):
    with pytest.raises(ConfigError, match="mix.lam"):
        submit.submit_job(TINY, "http://h:8265", overrides=["mix.lam=3"])
    with pytest.raises(ValueError, match="entrypoint"):
        submit.submit_job(TINY, "http://h:8265", entrypoint="check_cluster")
    assert captured == {}


def test_unreachable_cluster_is_a_clear_error(clean_env, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert submit.main(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


def test_cli_commands_register_in_the_wmss_cli():
    from wmss_ray.cli.main import build_parser

    parser = build_parser()
    ns = parser.parse_args(["submit", "configs/demo.yaml", "--set", "a.b=1", "--entrypoint", "eval", "--wait"])
    got = (ns.config, ns.overrides, ns.entrypoint, ns.wait, ns.address)
    assert got == ("configs/demo.yaml", ["a.b=1"], "eval", True, None)
    assert callable(ns.func)
    ns = parser.parse_args(["status", "raysubmit_1", "--address", "http://h:8265"])
    assert (ns.job_id, ns.address) == ("raysubmit_1", "http://h:8265") and callable(ns.func)
    ns = parser.parse_args(["logs", "raysubmit_1", "--follow"])
    assert ns.follow is True and callable(ns.func)


def test_working_dir_upload_stays_small(tmp_path):
    """What Ray would zip for working_dir (with our excludes and .gitignore) is far below 100 MiB."""
    from ray._private.runtime_env.packaging import _zip_files

    out = tmp_path / "pkg.zip"
    _zip_files(str(REPO), submit.WORKING_DIR_EXCLUDES, str(out), include_gitignore=True)
    assert out.stat().st_size < 100 * 1024**2
    import zipfile

    names = zipfile.ZipFile(out).namelist()
    assert "jobs/pipeline.py" in names and "wmss_ray/cli/submit.py" in names and "configs/test-tiny.yaml" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in n]
