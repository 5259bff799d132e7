"""The one learning-rate schedule: linear warm-up, then cosine decay to a floor at the last step.

Used by phase 0 (``training.pretrain``, plain torch) and every DeepSpeed phase
(``training.ds_config``) through ``torch.optim.lr_scheduler.LambdaLR``, stepped once per
optimizer step. Plain math, no torch needed.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length in optimizer steps: ``round(warmup_ratio * total_steps)``."""
    return int(round(warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps (so the
    first step already learns), then cosine decay from 1 to ``min_lr_ratio`` at the last step,
    ``total_steps - 1`` (the last step that runs gets the floor; later steps stay there).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
