"""Test support for the pipeline runner's tests: the real phase list with stand-in bodies."""

from __future__ import annotations

import dataclasses

from wmss_ray.pipeline import build_phases


def fake_phases(calls, fail_at=None):
    """``build_phases`` with each phase's body replaced: it appends its name to ``calls`` and
    returns fake outputs, or raises at ``fail_at``."""
    def make(name):
        def run(ctx):
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"boom in {name}")
            return {"outputs": {"model_dir": f"/fake/{name}", "steps": 3}, "counts": {"rows": 1}}
        return run

    def phases(cfg):
        real = build_phases(cfg)
        return [dataclasses.replace(p, run=make(p.name)) for p in real]

    return phases
