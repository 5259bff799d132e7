"""The one warm-up + cosine lr schedule (phase 0 and the DeepSpeed phases share it)."""

from __future__ import annotations

import math

import pytest

from wmss_ray.training.schedule import lr_factor, warmup_steps_for


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert abs(lr_factor(100, 100, 10, 0.1) - 0.1) < 1e-9


def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 7)))
    assert warmup_steps_for(10, 0.05) == 0 and lr_factor(0, 1, 0, 0.1) == pytest.approx(1.0)
