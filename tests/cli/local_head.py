"""A real, isolated, token-authenticated local Ray head for job-submission tests.

Started as ``ray start --head --block`` in its own session (process group) with:
- its own short temp dir and free ports for every head service, so it never meets another Ray
  cluster on the machine (and ``address="auto"`` inside its jobs resolves to it via RAY_ADDRESS);
- ``RAY_AUTH_MODE=token`` and a freshly generated token in a temp file (``RAY_AUTH_TOKEN_PATH``)
  and ``HOME`` pointed at the temp dir: the user's ``~/.ray/auth_token`` is never read or written
  (``XDG_CACHE_HOME`` stays the user's: compiled DeepSpeed ops are cached there);
- the venv's ``ray``/``python`` first on PATH, so jobs run with this interpreter.

``stop()`` ends only what this head started: the process group, then every recorded descendant
and any process whose command line names this head's unique temp dir, by pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

PORT_FLAGS = (
    "port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
)
POLL_S = 0.5  # interval of the bounded readiness poll


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):  # hold them all open so the n ports are distinct
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class LocalRayHead:
    def __init__(self, num_cpus: int = 4, object_store_bytes: int = 300 * 1024**2):
        self.num_cpus, self.object_store_bytes = num_cpus, object_store_bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="wj-", dir="/tmp"))  # short: unix socket paths
        self.token_file = self.tmp / "auth_token"
        self.token = secrets.token_hex(32)
        self.ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        self.dashboard_url = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.log_path = self.tmp / "head.log"
        self.proc: subprocess.Popen | None = None
        self._descendants: dict[int, psutil.Process] = {}

    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        (self.tmp / "home").mkdir(exist_ok=True)
        env.update(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), HOME=str(self.tmp / "home"),
            # the real cache, not one under the fake HOME: DeepSpeed's JIT-built CPU ops (shm comm)
            # live there, and a fresh cache rebuilt them in the job's first Train run (~30 s)
            XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
            PATH=bindir + os.pathsep + env.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0",
            TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0",
        )
        return env

    def start(self, timeout_s: float = 120.0) -> "LocalRayHead":
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        ray_bin = Path(sys.executable).parent / "ray"
        cmd = [str(ray_bin), "start", "--head", "--block", f"--temp-dir={self.tmp / 'r'}",
               f"--num-cpus={self.num_cpus}", f"--object-store-memory={self.object_store_bytes}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
        cmd += [f"--{flag}={port}" for flag, port in self.ports.items()]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env(), cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.dashboard_url}/api/version", timeout=2,
                                 headers={"Authorization": f"Bearer {self.token}"})
                if r.status_code == 200:
                    self._record_descendants()
                    return self
            except requests.RequestException:
                pass
            time.sleep(POLL_S)
        self.stop()
        raise TimeoutError(f"Ray head not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return "<no log>"

    def _record_descendants(self) -> None:
        if self.proc is None:
            return
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._descendants.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def _ours(self) -> list[psutil.Process]:
        """Processes whose command line names this head's unique temp dir (Ray passes it to all)."""
        marker, found = str(self.tmp), []
        for p in psutil.process_iter(["pid", "cmdline", "uids"]):
            try:
                mine = p.info["uids"] and p.info["uids"].real == os.getuid()
                if mine and marker in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the head's process group, SIGKILL what is left after ``grace_s``.

        A short grace: ``ray start --block`` never exits on SIGTERM while its gcs_server and
        dashboard linger, so a long grace was only waited out (30 s measured, every session);
        this head is disposable, nothing of it needs a clean shutdown."""
        if self.proc is None:
            return
        self._record_descendants()
        procs = {**self._descendants, **{p.pid: p for p in self._ours()}}
        procs.pop(os.getpid(), None)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group `ray start` leads (start_new_session)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        alive = [p for p in procs.values() if p.is_running()]
        for p in alive:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def finish_job(job_id: str, head: LocalRayHead, timeout_s: float) -> tuple[str, str]:
    """Wait for a job; ``(final status, logs)``. Past ``timeout_s`` the job is stopped and the
    test fails with the job's ``[wmss]`` progress lines and its log tail."""
    import pytest

    from wmss_ray.cli import submit

    try:
        status = submit.wait_for_job(job_id, head.dashboard_url, timeout_s=timeout_s, poll_s=1.0)
    except TimeoutError:
        logs = submit.job_logs(job_id, head.dashboard_url)
        submit.stop_job(job_id, head.dashboard_url)
        progress = "\n".join(line for line in logs.splitlines() if line.startswith("[wmss]"))
        pytest.fail(f"job {job_id} did not finish in {timeout_s:.0f}s; progress:\n{progress}\n"
                    f"log tail:\n{logs[-3000:]}")
    return status, submit.job_logs(job_id, head.dashboard_url)
