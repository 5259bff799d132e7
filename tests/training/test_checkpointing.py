"""Frozen-mode resume: the strong model loads strictly, only frozen weak weights may be absent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wmss_ray.training.checkpointing import CheckpointMismatchError, load_module_except_frozen


class _Pair(nn.Module):
    def __init__(self, tied: bool = True):
        super().__init__()
        self.strong = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11))
        self.weak = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11, bias=False))
        if tied:
            self.weak[1].weight = self.weak[0].weight  # a tied head: two names, one parameter
        self.weak.requires_grad_(False)


def _saved(pair: nn.Module) -> dict[str, torch.Tensor]:
    """What ``exclude_frozen_parameters`` writes: trainable parameters (and buffers) only."""
    trainable = {n for n, p in pair.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v.clone() for k, v in pair.state_dict().items() if k in trainable}


def test_frozen_weak_may_be_absent_strong_is_restored():
    torch.manual_seed(0)
    src, dst = _Pair(), _Pair()
    weak_before = {k: v.clone() for k, v in dst.weak.state_dict().items()}
    load_module_except_frozen(_saved(src), dst)
    for k, v in src.strong.state_dict().items():
        assert torch.equal(dst.strong.state_dict()[k], v), k
    for k, v in dst.weak.state_dict().items():
        assert torch.equal(v, weak_before[k]), k  # the fresh (init) weak weights are kept


def test_a_missing_strong_key_fails_and_names_it():
    state = _saved(_Pair())
    del state["strong.1.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys \['strong.1.bias'\]"):
        load_module_except_frozen(state, _Pair())


def test_an_unexpected_key_fails():
    state = {**_saved(_Pair()), "strong.2.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match="1 unexpected keys"):
        load_module_except_frozen(state, _Pair())


def test_a_trainable_weak_must_be_in_the_checkpoint():
    dst = _Pair(tied=False)
    dst.weak.requires_grad_(True)  # joint-mode pair: nothing is frozen, nothing may be absent
    with pytest.raises(CheckpointMismatchError, match="weak.0.weight"):
        load_module_except_frozen(_saved(_Pair(tied=False)), dst)


def test_a_checkpoint_resumes_only_its_own_run_and_a_result_needs_every_step():
    from wmss_ray.training.checkpointing import (
        ForeignCheckpointError, UntrainedStepsError, check_same_run, check_trained_all_steps,
    )

    mine = {"step": 4, "fingerprint": "abc", "segments": [[0, 2], [2, 4]]}  # killed after 2, resumed
    check_same_run(mine, "ckpt", "abc")
    check_trained_all_steps(mine, "ckpt", "abc", end=4)
    with pytest.raises(ForeignCheckpointError, match="other inputs \\(fingerprint abc\\); this run is xyz"):
        check_same_run(mine, "ckpt", "xyz")
    with pytest.raises(ForeignCheckpointError, match="older wmss-ray"):
        check_same_run({"step": 4}, "ckpt", "abc")
    # the stale-resume bug: a run that resumed a finished checkpoint trained no step of its own
    for bad in ({**mine, "segments": [[2, 4]]}, {**mine, "segments": [[0, 2], [3, 4]]},
                {**mine, "segments": [[0, 2]]}, {**mine, "step": 2, "segments": [[0, 2]]}):
        with pytest.raises(UntrainedStepsError, match="refusing to report"):
            check_trained_all_steps(bad, "ckpt", "abc", end=4)
