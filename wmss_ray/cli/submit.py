"""Submit WMSS runs to a running Ray cluster as Ray jobs, with Ray token authentication.

    job_id = submit_job("configs/demo.yaml", "http://127.0.0.1:8265", overrides=["mix.lam=0.45"])
    job_status(job_id, address)          # 'PENDING' | 'RUNNING' | 'SUCCEEDED' | 'FAILED' | 'STOPPED'
    print(job_logs(job_id, address))     # or: for chunk in job_logs(..., follow=True): ...

The job runs ``python -m jobs.<entrypoint> --config ... --set ...`` on the cluster (jobs/).

Code: from a source checkout the repository is uploaded as the job's ``working_dir`` (minus
``WORKING_DIR_EXCLUDES`` and whatever .gitignore excludes; Ray caps the upload, and this project
keeps it far below 100 MiB). An installed package uploads nothing: the cluster's image must carry
the package (the k8s/ path). Pass ``runtime_env`` to choose yourself.

Config: validated here first (a typo fails before anything is sent). When the file is inside the
uploaded working_dir the job gets its relative path; otherwise its YAML text travels inline in
the job's environment (``--config env:WMSS_CONFIG_YAML``), so the job always sees this config.

Token: ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else Ray's default
``~/.ray/auth_token`` (the order Ray itself uses). It is sent as an ``Authorization: Bearer``
header and is never printed, logged or put in the job's environment (the job inherits the
cluster's own token). A 401/403 from the cluster raises ``AuthError`` saying what to set.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from wmss_ray.cluster import TOKEN_HELP, AuthTokenError, load_auth_token
from wmss_ray.config.loading import load_config
from wmss_ray.config.schema import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINTS = ("pipeline", "score", "train", "eval", "tune")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
INLINE_CONFIG_ENV = "WMSS_CONFIG_YAML"
MAX_INLINE_CONFIG_BYTES = 64 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKING_DIR_EXCLUDES = [
    ".git/", ".venv/", "venv/", "runs/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/",
    ".hypothesis/", "build/", "dist/", "benchmarks/results/", "benchmarks/out/", "tmp/",
]
DEFAULT_JOB_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the request."""


class AuthError(SubmitError):
    """The cluster answered 401/403: the auth token is missing or wrong."""


class JobFailedError(SubmitError):
    def __init__(self, job_id: str, status: str, message: str = ""):
        self.job_id, self.status = job_id, status
        super().__init__(f"job {job_id} ended {status}" + (f": {message}" if message else ""))


# ----------------------------------------------------------------------------- connection


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_ADDRESS``, else http://127.0.0.1:8265; http:// added if bare."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def _load_token() -> str | None:
    """The token in Ray's order (``wmss_ray.cluster.load_auth_token``), as an ``AuthError``."""
    try:
        return load_auth_token()
    except AuthTokenError as err:
        raise AuthError(str(err)) from None


@contextmanager
def _errors(address: str) -> Iterator[None]:
    """Map Ray client errors to SubmitError/AuthError with messages that never hold the token."""
    try:
        yield
    except SubmitError:
        raise
    except ConnectionError as err:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({err}); is the cluster up "
                          "and the address the dashboard's (port 8265, e.g. via kubectl port-forward)?") from None
    except Exception as err:
        if type(err).__name__ != "AuthenticationError":
            raise
        code = "403, token wrong" if "Authentication failed" in str(err) else "401, token missing"
        raise AuthError(f"the Ray cluster at {address} refused the request (HTTP {code}): "
                        f"token missing or wrong; {TOKEN_HELP}") from None


def _client(address: str | None) -> tuple[Any, str]:
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token = _load_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with _errors(address):
        return JobSubmissionClient(address, headers=headers), address


# ----------------------------------------------------------------------------- runtime env and config


def is_source_checkout(root: Path = REPO_ROOT) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "jobs").is_dir() and (root / "wmss_ray").is_dir()


def default_runtime_env() -> dict[str, Any]:
    """Upload the checkout as working_dir (with excludes), or nothing for an installed package."""
    env: dict[str, Any] = {"env_vars": dict(DEFAULT_JOB_ENV)}
    if is_source_checkout():
        env.update(working_dir=str(REPO_ROOT), excludes=list(WORKING_DIR_EXCLUDES))
    return env


def _relative_in_upload(config: Path, runtime_env: dict[str, Any]) -> str | None:
    """The config's path inside the uploaded working_dir, or None if it would not be uploaded."""
    wd = runtime_env.get("working_dir")
    if not wd or "://" in str(wd) or not Path(wd).is_dir():
        return None
    wd_path = Path(wd).resolve()
    if wd_path not in config.parents:
        return None
    rel = config.relative_to(wd_path).as_posix()
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches excludes with

    patterns = list(runtime_env.get("excludes") or [])
    for ignore in (".gitignore", ".rayignore"):
        if (wd_path / ignore).is_file():
            patterns += (wd_path / ignore).read_text().splitlines()
    return None if PathSpec.from_lines("gitwildmatch", patterns).match_file(rel) else rel


def build_entrypoint(name: str, config_arg: str, overrides: list[str] | None = None,
                     extra_args: list[str] | None = None) -> str:
    """``python -m jobs.<name> --config ... --set ...`` as one shell-quoted string."""
    argv = ["python", "-m", f"jobs.{name}", "--config", config_arg]
    for item in overrides or []:
        argv += ["--set", item]
    return shlex.join(argv + list(extra_args or []))


# ----------------------------------------------------------------------------- the API


def submit_entrypoint(command: str, address: str | None = None, runtime_env: dict[str, Any] | None = None,
                      submission_id: str | None = None, metadata: dict[str, str] | None = None) -> str:
    """Submit any shell command as a Ray job (e.g. ``python -m jobs.check_cluster``); returns its id."""
    client, address = _client(address)
    with _errors(address):
        return client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id,
                                 metadata=metadata)


def submit_job(config_path: str | Path, address: str | None = None, overrides: list[str] | None = None,
               entrypoint: str = "pipeline", runtime_env: dict[str, Any] | None = None, wait: bool = False,
               *, extra_args: list[str] | None = None, submission_id: str | None = None,
               timeout_s: float | None = None) -> str:
    """Validate the config locally, submit ``python -m jobs.<entrypoint>``, return the job id.

    ``wait=True`` blocks until the job ends (at most ``timeout_s``) and raises ``JobFailedError``
    unless it SUCCEEDED. ``extra_args`` go after the config args (e.g. ``["--from-phase", "eval"]``).
    """

    if entrypoint not in ENTRYPOINTS:
        raise ValueError(f"entrypoint {entrypoint!r}: expected one of {', '.join(ENTRYPOINTS)}")
    config = Path(config_path).expanduser().resolve()
    cfg = load_config(config, overrides)  # ConfigError here, before anything is sent
    if "://" not in cfg.run.storage and not Path(cfg.run.storage).is_absolute():
        log.warning("run.storage %r is relative: on the cluster it resolves in the job's working directory "
                    "(a temporary copy of the upload, or the image's read-only /app), not on shared storage; "
                    "pass e.g. --set run.storage=/mnt/wmss/runs (a path every node sees)", cfg.run.storage)
    env = default_runtime_env() if runtime_env is None else dict(runtime_env)
    env_vars = {**DEFAULT_JOB_ENV, **(env.get("env_vars") or {})}
    config_arg = _relative_in_upload(config, env)
    if config_arg is None:
        text = config.read_text()
        if len(text.encode()) > MAX_INLINE_CONFIG_BYTES:
            raise SubmitError(f"{config_path}: too large to pass inline ({len(text)} bytes); put it in the working_dir")
        env_vars[INLINE_CONFIG_ENV] = text
        config_arg = f"env:{INLINE_CONFIG_ENV}"
    env["env_vars"] = env_vars
    command = build_entrypoint(entrypoint, config_arg, overrides, extra_args)
    metadata = {"wmss_entrypoint": entrypoint, "wmss_config": config.name, "wmss_run": cfg.run.name}
    job_id = submit_entrypoint(command, address, env, submission_id=submission_id, metadata=metadata)
    if wait:
        status = wait_for_job(job_id, address, timeout_s=timeout_s)
        if status != "SUCCEEDED":
            raise JobFailedError(job_id, status, _job_message(job_id, address))
    return job_id


def job_status(job_id: str, address: str | None = None) -> str:
    """'PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED' or 'STOPPED'."""
    client, address = _client(address)
    with _errors(address):
        status = client.get_job_status(job_id)
    return str(getattr(status, "value", status))


def stop_job(job_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop the job; True if a stop was requested (False if already ended)."""
    client, address = _client(address)
    with _errors(address):
        return bool(client.stop_job(job_id))


def _job_message(job_id: str, address: str | None) -> str:
    client, address = _client(address)
    with _errors(address):
        return client.get_job_info(job_id).message or ""


def wait_for_job(job_id: str, address: str | None = None, timeout_s: float | None = None,
                 poll_s: float = 2.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; ``TimeoutError`` after ``timeout_s``."""
    client, address = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        with _errors(address):
            raw = client.get_job_status(job_id)
        status = str(getattr(raw, "value", raw))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def job_logs(job_id: str, address: str | None = None, follow: bool = False) -> str | Iterator[str]:
    """The job's logs so far (a string), or with ``follow=True`` an iterator of chunks until it ends."""
    client, address = _client(address)
    if not follow:
        with _errors(address):
            return client.get_job_logs(job_id)
    return _follow(client, address, job_id)


def _follow(client: Any, address: str, job_id: str) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            with _errors(address):
                try:
                    chunk = loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
            yield chunk
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


# ----------------------------------------------------------------------------- CLI


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help=f"Ray dashboard URL (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")


def _cmd_submit(args: argparse.Namespace) -> int:
    runtime_env = {"env_vars": dict(DEFAULT_JOB_ENV)} if args.no_upload else None
    extra = ["--from-phase", args.from_phase] if args.from_phase else []
    if extra and args.entrypoint != "pipeline":
        raise SubmitError("--from-phase applies to --entrypoint pipeline only")
    job_id = submit_job(args.config, args.address, args.overrides, args.entrypoint, runtime_env,
                        extra_args=extra, submission_id=args.submission_id)
    print(job_id, flush=True)
    if not args.wait:
        print(f"# follow: wmss logs {job_id} --follow" + (f" --address {args.address}" if args.address else ""),
              file=sys.stderr)
        return 0
    for chunk in job_logs(job_id, args.address, follow=True):
        print(chunk, end="", flush=True)
    status = wait_for_job(job_id, args.address)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    print(job_status(args.job_id, args.address))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    if args.follow:
        for chunk in job_logs(args.job_id, args.address, follow=True):
            print(chunk, end="", flush=True)
    else:
        print(job_logs(args.job_id, args.address), end="")
    return 0


def _guarded(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except JobFailedError as err:
            print(f"wmss: {err}", file=sys.stderr)
            return 1
        except (SubmitError, ConfigError) as err:
            print(f"wmss: {err}", file=sys.stderr)
            return 2
    return run


def add_cli_commands(subparsers: Any) -> None:
    """Register ``submit``, ``status`` and ``logs``; each sets ``func(args) -> exit code``."""
    p = subparsers.add_parser("submit", help="submit a run to a Ray cluster as a Ray job (token auth)")
    p.add_argument("config", help="YAML config (validated here, then sent with the job)")
    _address_arg(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set run.storage=/mnt/wmss/runs (repeatable)")
    p.add_argument("--entrypoint", choices=ENTRYPOINTS, default="pipeline",
                   help="jobs.<name> to run (default pipeline)")
    p.add_argument("--from-phase", default=None, help="pipeline only: rerun from this phase on")
    p.add_argument("--wait", action="store_true", help="stream the logs and wait; exit 1 unless it succeeds")
    p.add_argument("--no-upload", action="store_true",
                   help="upload no code: the cluster's image has the package (config goes inline)")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray generates one)")
    p.set_defaults(func=_guarded(_cmd_submit))

    p = subparsers.add_parser("status", help="status of a submitted Ray job")
    p.add_argument("job_id", metavar="JOB")
    _address_arg(p)
    p.set_defaults(func=_guarded(_cmd_status))

    p = subparsers.add_parser("logs", help="logs of a submitted Ray job")
    p.add_argument("job_id", metavar="JOB")
    _address_arg(p)
    p.add_argument("--follow", action="store_true", help="stream until the job ends")
    p.set_defaults(func=_guarded(_cmd_logs))


def main(argv: list[str] | None = None) -> int:
    """``python -m wmss_ray.cli.submit submit|status|logs ...`` (the same commands as ``wmss``)."""
    parser = argparse.ArgumentParser(prog="python -m wmss_ray.cli.submit")
    add_cli_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)  # each command is _guarded: errors are one line + exit code


if __name__ == "__main__":
    raise SystemExit(main())
