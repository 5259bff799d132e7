"""``HostDeviceCheck``: CUDA's "tensors on two devices" errors, reproduced on a CPU-only machine.

On a GPU a step crashes when it combines a tensor it made on the host (a factory call without
``device=``, ``torch.from_numpy``, ``.cpu()``) with the rank's device tensors, e.g.
``torch.stack([cuda_sum, torch.tensor(float(n))])``. On CPU both are CPU tensors and nothing
fails, and the ``meta`` device cannot run the step (``nonzero``, data-dependent loops), so this
``TorchFunctionMode`` keeps a second, virtual device: tensors made on the host inside the mode are
tagged "host", everything else (inputs, parameters, tensors made with an explicit ``device=``)
is "device". The tag follows every torch call (an op on host tensors only gives host tensors),
``.to(device)`` / ``.cuda()`` / ``.to(other)`` move a tensor to the device and ``.cpu()`` to the
host, and any call that takes host and device tensors together raises, naming the call.

It also lists the step's device-to-host syncs (``host_reads``): a device tensor's value read on
the host (``item``, ``bool``/``int``/``float``, ``tolist``, ``numpy``) or an op whose output size
depends on device values (``nonzero``, ``masked_select``, indexing with a boolean mask).
``loss.backward()`` inside the mode runs with the mode on, so a custom ``autograd.Function``'s
backward is checked too.

Stricter than CUDA on one point: CUDA lets a 0-dim CPU tensor into elementwise ops; this check
refuses it too (the code should not rely on it: it is a host-to-device copy per call).
Host-side code the step runs on purpose (collating, ``numpy``) uses host tensors only, which is
allowed.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode

_TAG = "_wmss_on_host"
#: Calls that make a tensor from nothing: on the host unless given ``device=``.
_FACTORIES = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint,
              torch.randperm, torch.scalar_tensor, torch.asarray}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
#: Calls CUDA runs across devices: a copy between devices (the destination keeps its place).
_ACROSS = {torch.Tensor.copy_}
#: Calls that read a tensor's values on the host (a device-to-host sync on a GPU).
_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.nonzero, torch.Tensor.nonzero,
          torch.masked_select, torch.Tensor.masked_select, torch.argwhere, torch.Tensor.argwhere}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def on_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _tag(out, host: bool) -> None:
    for t in _tensors(out):
        try:
            setattr(t, _TAG, host)
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass without a __dict__
            pass


def _caller() -> str:
    """``file:line`` of the first frame outside torch and this module."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename == __file__ or f"{os.sep}torch{os.sep}" in f.f_code.co_filename):
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


def _bool_index(index) -> bool:
    return any(t.dtype == torch.bool for t in _tensors(index if isinstance(index, tuple) else (index,)))


def _moves_to_device(args, kwargs) -> bool:
    """Whether ``Tensor.to(...)`` names a device (or a tensor whose device to take)."""
    if "device" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str, int)) or isinstance(a, torch.Tensor) for a in args[1:])


class HostDeviceCheck(TorchFunctionMode):
    """Within ``with HostDeviceCheck():`` a call mixing host-made and device tensors raises
    ``RuntimeError`` (as CUDA would); ``made_on_host`` lists the host factory calls seen,
    ``host_reads`` the device-to-host syncs."""

    def __init__(self):
        super().__init__()
        self.made_on_host: list[str] = []
        self.host_reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if func is torch.Tensor.backward and len(args) == 1 and not any(kwargs.values()):  # loss.backward()
            with self:
                loss = args[0]
                torch.autograd.Variable._execution_engine.run_backward(
                    (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)
            return None
        if (func in _READS and args and not on_host(args[0])) or (
                func in _INDEXING and _bool_index(args[1]) and not on_host(args[0])):
            self.host_reads.append(f"{name} at {_caller()}")
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            host = kwargs.get("device") is None
            if host:
                self.made_on_host.append(name)
            _tag(out, host)
            return out
        if func in _MOVES:
            if func is torch.Tensor.cpu:
                host = True
            elif func is torch.Tensor.cuda or _moves_to_device(args, kwargs):
                host = False
            else:  # a dtype change only: stays where it was
                host = on_host(args[0])
            if out is args[0] and host != on_host(out):
                # On CPU a move returns its input itself; on a GPU it is a new tensor, and the
                # input stays where it was (a batch collated on the host is still read there).
                out = out.view_as(out)  # (the mode is off inside its own __torch_function__)
            _tag(out, host)
            return out
        if func in _ACROSS:
            return out
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        if not ins:
            return out
        host = [on_host(t) for t in ins]
        if any(host) and not all(host):
            shapes = [(tuple(t.shape), "host" if h else "device") for t, h in zip(ins, host)]
            raise RuntimeError(f"{name} mixes tensors made on the host with device tensors "
                               f"(CUDA: 'Expected all tensors to be on the same device'): {shapes}")
        _tag(out, all(host))
        return out
