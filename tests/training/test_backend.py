"""``training/backend.py``'s ``RankGroupConfig`` does what Ray's ``TorchConfig`` does, step for step,
without torch in the process that holds it. Both backends drive a recording worker group (no
Ray, no process group): the same worker-side functions in the same order with the same arguments,
on CPU and GPU workers; the same shutdown; the same train-function context and settings. The run's
real controller is checked in ``test_training_ray.py`` (``ControllerImports``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wmss_ray.training import backend as ours

MASTER = ("10.1.2.3", 29500)


class RecordingGroup:
    """A worker group of ``n`` workers that records each call as ``(what, rank or "all", kwargs)``:
    ``what`` is the worker-side function's name (ours reach Ray's through ``_on_worker``)."""

    def __init__(self, n: int, gpus: float):
        self.n, self.gpus, self.calls = n, gpus, []

    def _record(self, rank, fn, args, kwargs):
        if fn is ours._on_worker:
            name, args = args[0], args[1:]
        else:
            name = {"set_env_vars": "master", "_set_master": "master"}.get(fn.__name__, fn.__name__)
        assert not args, (name, args)
        self.calls.append((name, rank, kwargs))

    def __len__(self):
        return self.n

    def get_resources_per_worker(self):
        return {"CPU": 1.0, "GPU": self.gpus}

    def execute_single(self, rank, fn, *args, **kwargs):
        self._record(rank, fn, args, kwargs)
        return MASTER

    def execute(self, fn, *args, **kwargs):
        self._record("all", fn, args, kwargs)

    def execute_single_async(self, rank, fn, *args, **kwargs):
        self._record(rank, fn, args, kwargs)
        return rank

    def execute_async(self, fn, *args, **kwargs):
        self._record("all", fn, args, kwargs)
        return []


@pytest.fixture
def no_ray_get(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)


@pytest.mark.parametrize("n,gpus,backend", [(2, 0, "gloo"), (3, 1, "nccl"), (1, 0, None), (2, 0.5, None)])
def test_the_backend_makes_the_calls_ray_s_torch_backend_makes(no_ray_get, n, gpus, backend):
    from ray.train.torch.config import TorchConfig, _TorchBackend

    theirs_group, ours_group = RecordingGroup(n, gpus), RecordingGroup(n, gpus)
    _TorchBackend().on_start(theirs_group, TorchConfig(backend=backend))
    ours.RankGroupConfig(backend=backend).backend_cls().on_start(ours_group, ours.RankGroupConfig(backend=backend))
    assert ours_group.calls == theirs_group.calls
    setups = [c for c in ours_group.calls if c[0] == "_setup_torch_process_group"]
    assert [c[1] for c in setups] == list(range(n)) and setups[0][2]["init_method"] == "env://"
    assert {c[2]["backend"] for c in setups} == {backend or ("nccl" if gpus else "gloo")}
    theirs_group.calls.clear()
    ours_group.calls.clear()
    _TorchBackend().on_shutdown(theirs_group, TorchConfig(backend=backend))
    ours.RankGroupConfig().backend_cls().on_shutdown(ours_group, ours.RankGroupConfig())
    assert ours_group.calls == theirs_group.calls == [("_shutdown_torch", "all", {"destroy_process_group": n > 1})]


def test_the_settings_and_the_train_function_context_are_ray_s():
    from ray.train.torch.config import TorchConfig, TorchConfigContextManager, _TorchBackend

    cfg, theirs = ours.RankGroupConfig(backend="gloo"), TorchConfig(backend="gloo")
    assert cfg.to_dict() == theirs.to_dict() and cfg.framework == theirs.framework
    assert cfg.timeout_s == theirs.timeout_s and cfg.backend_cls.share_cuda_visible_devices is True
    assert _TorchBackend.share_cuda_visible_devices is True
    ctx = cfg.train_func_context()
    with ctx:  # on a CPU worker Ray's context changes nothing; on a GPU one it sets the device
        assert isinstance(ctx._inner, TorchConfigContextManager)


def test_the_master_address_reaches_the_worker_environment(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    ours._set_master(*MASTER)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.2.3", "29500")


def test_holding_the_config_imports_no_torch():
    """What the controller does with it: unpickle, build the backend, read its settings."""
    code = ("import pickle, sys; from wmss_ray.training.backend import RankGroupConfig as C; "
            "c = pickle.loads(pickle.dumps(C(backend='gloo'))); c.backend_cls(); c.framework; c.to_dict(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
