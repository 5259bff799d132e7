"""The one Ray start-up: join a running cluster when there is one, else start a local one.

Every phase calls :func:`ensure_ray` before it touches Ray; it is the only ``ray.init`` call in
the package (``tests/test_imports.py`` checks). The decision is a pure function of the
environment, :func:`plan_ray_start`, tested without Ray:

- Ray already initialised in this process (tests, a phase after another): nothing to do.
- A job's driver (``ray job submit`` / ``wmss submit`` / a KubeRay RayJob): Ray sets
  ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and ``RAY_ADDRESS``; join that cluster and pass no
  ``runtime_env``: the job's own (``wmss_ray.cli.submit.default_runtime_env``: working dir, env
  vars) applies, and a second one here would replace it.
- ``RAY_ADDRESS`` set (a driver started by hand next to a cluster): join it, with the runtime
  env below.
- Otherwise: start a local cluster (``num_cpus`` when given), with the runtime env below.

The runtime-env policy (:data:`RUNTIME_ENV_VARS`): ``TOKENIZERS_PARALLELISM=false`` (tokenizer
threads forked into Ray workers deadlock or warn). It never carries ``RAY_AUTH_*``: a cluster's
workers have their own token, and a token must not be copied into a job's environment.

Token authentication (docs/CLUSTER.md): with ``RAY_AUTH_MODE=token`` a joining driver needs the
token from, in Ray's order, ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``
(which must be readable and non-empty), else ``~/.ray/auth_token``. :func:`load_auth_token`
looks in that order; a missing token fails here with what to set, before Ray's own less clear
error. The token is never printed or logged. A job's driver runs on a cluster node and inherits
that node's token, so nothing is checked there.

A cluster that does not answer at a given address is :class:`RayUnreachableError` (a
:class:`~wmss_ray.io.errors.UserError`: one line naming the address, no traceback).

Layer: below every phase module; imports the standard library, ``wmss_ray.io.errors`` (and ``ray`` lazily).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wmss_ray.io.errors import UserError

log = logging.getLogger("wmss_ray.cluster")

RUNTIME_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false"}
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver
#: How to give a driver or ``wmss submit`` the cluster's token (every "token missing or wrong" message).
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it, "
              "or write it to ~/.ray/auth_token). On Kubernetes: export RAY_AUTH_TOKEN=\"$(kubectl get secret "
              "wmss-ray-auth -o jsonpath='{.data.auth_token}' | base64 -d)\"; see docs/CLUSTER.md")


class AuthTokenError(UserError, RuntimeError):
    """Token authentication is on but the token cannot be found or read (message holds no token)."""


class RayUnreachableError(UserError, ConnectionError):
    """No Ray cluster answers at the address a driver was told to join."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` at this moment (the OS picks it; ``""``: on every interface, for a
    port other nodes connect to). Free now, not reserved: bind it soon, and retry if it was taken."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def unreachable_message(address: str, err: BaseException) -> str:
    """One line: which address did not answer, Ray's reason, and what to do."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"no Ray cluster answers at {address!r} ({reason}); start one there (`ray start --head`), "
            "fix RAY_ADDRESS / --address, or unset RAY_ADDRESS to run on a local Ray")


@dataclass(frozen=True)
class RayInitPlan:
    """What :func:`ensure_ray` will do: ``mode`` is "join-job", "join" or "local"."""

    mode: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of Ray's init call


def load_auth_token(environ: Mapping[str, str] | None = None, home: str | Path | None = None) -> str | None:
    """The Ray auth token in Ray's order, or None when none is configured.

    Raises:
        AuthTokenError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty
            (like Ray: a named token file is never silently skipped).
    """
    env = os.environ if environ is None else environ
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise AuthTokenError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({err.strerror})") from None
        if not token:
            raise AuthTokenError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token
    default = Path(home if home is not None else Path.home()) / ".ray" / "auth_token"
    try:
        return default.read_text().strip() or None
    except OSError:
        return None


def plan_ray_start(environ: Mapping[str, str] | None = None, num_cpus: int | None = None,
                  home: str | Path | None = None, address: str | None = None) -> RayInitPlan:
    """Decide how to start Ray from the environment alone (no Ray needed; see the module doc).

    ``address`` (e.g. "auto", "10.0.0.1:6379") joins that cluster and never starts one, as the
    ``jobs/`` entrypoints want; a job's driver still joins its own cluster.

    Raises:
        AuthTokenError: joining a cluster with ``RAY_AUTH_MODE=token`` and no token found.
    """
    env = os.environ if environ is None else environ
    base: dict[str, Any] = {"logging_level": "WARNING"}
    runtime_env = {"env_vars": dict(RUNTIME_ENV_VARS)}
    if env.get(JOB_DRIVER_ENV):
        return RayInitPlan("join-job", {**base, "address": address or env.get("RAY_ADDRESS") or "auto"})
    join = address or env.get("RAY_ADDRESS")
    if join:
        if env.get("RAY_AUTH_MODE", "").lower() == "token" and load_auth_token(env, home) is None:
            raise AuthTokenError(f"RAY_AUTH_MODE=token but no auth token for {join}; {TOKEN_HELP}")
        return RayInitPlan("join", {**base, "address": join, "runtime_env": runtime_env})
    kwargs = {**base, "runtime_env": runtime_env}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    return RayInitPlan("local", kwargs)


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> str:
    """Connect this process to Ray once (the package's only ``ray.init``); returns the mode.

    ``num_cpus`` caps a local cluster only (ignored when joining); ``address`` joins that
    cluster only (``ray.init`` raises ``ConnectionError`` when none is there). Returns "already"
    when Ray was initialised before, else the :class:`RayInitPlan` mode that ran.
    """
    import ray

    if ray.is_initialized():
        return "already"
    plan = plan_ray_start(num_cpus=num_cpus, address=address)
    log.info("ray start-up: %s", plan.mode)  # never the kwargs' env: nothing secret, but keep it short
    try:
        ray.init(**plan.kwargs)
    except ConnectionError as err:  # joining only: a local start does not connect anywhere
        raise RayUnreachableError(unreachable_message(str(plan.kwargs.get("address")), err)) from err
    return plan.mode
