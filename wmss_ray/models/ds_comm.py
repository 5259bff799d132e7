"""DeepSpeed's communication backend, started once per process on the existing torch group.

Without its CPU shared-memory all-reduce op: DeepSpeed's CPU accelerator JIT-compiles that op
(``deepspeed_shm_comm``, C++ with OpenMP) when its comm backend starts, but only
``inference_all_reduce`` (tensor-parallel inference) ever calls it; training and our weak pool
use torch.distributed's collectives. The build took 60-67 CPU-s (a minute or more on 2 cores) in
every fresh install and venv, in each process that finds no cached build (the first Ray Train run
of a CPU demo waits on it). On a GPU the accelerator has no such op; nothing changes there.
"""

from __future__ import annotations

#: DeepSpeed's name of the CPU shared-memory all-reduce op (``ShareMemCommBuilder.NAME``).
SHM_OP = "deepspeed_shm_comm"


def init_deepspeed_comm() -> None:
    """Start DeepSpeed's comm backend (without the shm op) over the initialised torch group;
    a no-op when it runs already. Call before ``deepspeed.initialize`` / ``zero.Init``."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    if deepspeed.comm.is_initialized():
        return
    # DeepSpeed keeps the probed op table in the module so that edits to it persist (its comment);
    # an op marked incompatible is never built (deepspeed.comm.torch.build_shm_op).
    deepspeed.ops.__compatible_ops__[SHM_OP] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
