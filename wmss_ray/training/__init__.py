"""Phase 1 (SFT) and phase 2B (WMSS) training on Ray Train + DeepSpeed (docs/TRAINING.md).

Public entry: :func:`train_phase` -> :class:`TrainResult`. Imported lazily so that
``import wmss_ray.training.<module>`` does not pull in Ray Train.
"""

from __future__ import annotations

__all__ = ["TrainResult", "train_phase"]


def __getattr__(name: str):
    if name in __all__:
        from wmss_ray.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'wmss_ray.training' has no attribute {name!r}")
