"""``training/ds_config.py``: the optimizer's parameter groups (the DeepSpeed config itself is
checked in ``test_dataset.py``'s batch-geometry tests)."""

from __future__ import annotations

import torch

from wmss_ray.training.ds_config import param_groups


def test_weight_decay_goes_to_matrices_also_when_zero3_partitioned_them():
    """Under ZeRO-3's ``zero.Init`` every parameter is a 1-D placeholder (its shape is in
    ``ds_shape``): a matrix must still get weight decay, a norm weight must not. Before, every
    ZeRO-3 parameter landed in the no-decay group, so a ZeRO-3 run decayed nothing and its
    optimizer had other groups than a ZeRO-2 run's (a checkpoint could not move between them)."""
    module = torch.nn.Module()
    module.matrix = torch.nn.Parameter(torch.empty(0))
    module.matrix.ds_shape = torch.Size([8, 4])
    module.norm = torch.nn.Parameter(torch.empty(0))
    module.norm.ds_shape = torch.Size([4])
    module.plain = torch.nn.Parameter(torch.zeros(3, 3))
    groups = {g["name"]: g for g in param_groups({"strong": (module, 1e-3)}, weight_decay=0.1)}
    assert [p is module.matrix or p is module.plain for p in groups["strong.decay"]["params"]] == [True, True]
    assert groups["strong.no_decay"]["params"] == [module.norm] and groups["strong.no_decay"]["weight_decay"] == 0.0
