"""The control arms (``controls.arms``): how many steps each trains and with which settings.

Every arm is SFT continued from M1 through the same ``train_phase`` as SFT-continued (the
equal-update control); only its step count or one training setting differs. Plain code, no Ray.

FLOPs per optimizer step, with PaLM's convention (:func:`model_flops_per_token`, the GPU check's:
``6 N + 12 L H d T`` per token for a trained model, ``2 N + 4 L H d T`` for a forward-only one,
so a frozen forward is exactly 1/3 of a training step at the same tokens): an SFT step is 1 unit,
a frozen WMSS step ``1 + 1/3`` (the weak forward; ``mix.weak_source: uniform`` runs none), a joint
step 2 (both trained). The same rows per step in both, so the ratio is independent of the model
and the sequence length.
"""

from __future__ import annotations

from typing import Any

#: Training FLOPs of one WMSS step in SFT steps, by weak-side cost (see the module docstring).
FROZEN_FORWARD_FRACTION = 1.0 / 3.0


def model_flops_per_token(n_params: int, layers: int, heads: int, head_dim: int, seq_len: float,
                          trained: int, frozen: int) -> float:
    """Model FLOPs per token (PaLM's MFU convention) of ``trained`` trained and ``frozen``
    forward-only models of ``n_params`` parameters each (N counts a tied embedding once: the
    output head's product): ``6 N + 12 L H d T`` per trained model, ``2 N + 4 L H d T`` per frozen
    one, ``T`` the mean row length (attention not halved for causality). Checkpointing's recompute
    is not counted (it is not model work). The GPU check's MFU and the study's FLOPs column."""
    attn = layers * heads * head_dim * seq_len
    return trained * (6 * n_params + 12 * attn) + frozen * (2 * n_params + 4 * attn)


def trained_and_frozen(phase: str, mode: str, weak_source: str = "model") -> tuple[int, int]:
    """How many models a step of ``phase`` (``sft`` or ``wmss``) trains and runs forward-only:
    SFT (1, 0); WMSS joint (2, 0), frozen (1, 1), frozen with a uniform fake weak side (1, 0)."""
    if phase == "sft":
        return 1, 0
    ratio = wmss_step_flops_ratio(mode, weak_source)
    return (2, 0) if ratio == 2.0 else (1, 1) if ratio > 1.0 else (1, 0)


def wmss_step_flops_ratio(mode: str, weak_source: str = "model") -> float:
    """FLOPs of a WMSS step over an SFT step's at the same batch: joint 2, frozen 4/3 (a uniform
    fake weak side runs no weak forward: 1)."""
    if mode == "joint":
        return 2.0
    if mode != "frozen":
        raise ValueError(f"WMSS mode must be joint or frozen, got {mode!r}")
    return 1.0 if weak_source == "uniform" else 1.0 + FROZEN_FORWARD_FRACTION


def arm_steps(arm: str, wmss_steps: int, mode: str, weak_source: str = "model") -> int:
    """Optimizer steps of control ``arm`` after WMSS phases of ``wmss_steps`` steps in total:
    the same count (equal updates), or for ``sft_matched_flops`` ``round(wmss_steps x ratio)``."""
    if arm == "sft_matched_flops":
        return int(round(wmss_steps * wmss_step_flops_ratio(mode, weak_source)))
    return wmss_steps


def arm_overrides(arm: str, cfg: Any) -> list[str]:
    """``--set`` style overrides of the run config that make its training ``arm``'s."""
    c = cfg.controls
    if arm == "sft_higher_lr":
        return [f"training.lr={cfg.training.lr * c.higher_lr_factor!r}"]
    if arm == "sft_label_smoothing":
        return [f"training.label_smoothing={c.label_smoothing!r}"]
    if arm == "sft_matched_flops":
        return []
    raise ValueError(f"unknown control arm {arm!r}")


def arm_sections(arm: str) -> list[str]:
    """The config keys an arm's result depends on beyond ``run.seed``, ``training``, ``scaling``."""
    return {"sft_matched_flops": ["mix.mode", "mix.weak_source"],
            "sft_higher_lr": ["controls.higher_lr_factor"],
            "sft_label_smoothing": ["controls.label_smoothing"]}[arm]
