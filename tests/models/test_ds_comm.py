"""DeepSpeed's comm backend starts without its CPU shared-memory all-reduce op (never JIT-built).

In a fresh process with an empty op cache (``TORCH_EXTENSIONS_DIR``), as on a fresh install:
``training.ds_config.init_engine`` (every training rank's ``deepspeed.initialize``) must start
DeepSpeed's backend with no shm op and build nothing. Before, the same call compiled the op
(60-67 CPU-s on this machine) into the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json
import torch
from wmss_ray.config.schema import TrainingConfig
from wmss_ray.training.ds_config import init_engine
from wmss_ray.training.worker import init_single_process
init_single_process()  # a 1-rank gloo group, as the training tests make
model = torch.nn.Linear(4, 4)
groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
engine = init_engine(model, groups, TrainingConfig(), 1, 2, torch.float32, on_gpu=False)
import deepspeed.comm.comm as ds_comm
print(json.dumps({"shm_op": ds_comm.cdb.shm_comm_op is not None, "ds_initialized": ds_comm.is_initialized()}))
"""


def test_training_engine_starts_deepspeed_comm_without_building_the_shm_op(tmp_path):
    cache = tmp_path / "torch_extensions"
    cache.mkdir()
    # not this process's group: a test before may have made one here (its MASTER_PORT is taken)
    dist_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in dist_env}
    env.update(TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"shm_op": False, "ds_initialized": True}
    assert not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())  # nothing compiled
