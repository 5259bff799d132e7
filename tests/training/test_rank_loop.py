"""The rank loop's validation point on 2 gloo ranks: every rank validates the model just exported.

Rank 0 alone writes ``interim_model/``; the other ranks read it right after. Here rank 0's
export is slow (it starts writing only once rank 1 has read the directory, or after 2 s) and
``interim_model/`` still holds the previous validation point's model, so a rank that does not
wait for the export validates the previous model. What a rank reads stands in for the model
(``validate_on_ranks`` itself, the real evaluator on 2 ranks, is ``test_validation.py``'s).
Plain ``torch.distributed`` (gloo on 127.0.0.1), no Ray.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import torch.multiprocessing as mp

STEP = 3
#: The longest rank 0's export waits for rank 1 to have read the directory (it never does when
#: the ranks wait for the export, so the export takes this long).
SLOW_EXPORT_S = 2.0
WEIGHTS = "weights.txt"


class _SlowExport:
    """``PhaseWorker.export`` as at ZeRO stages 0-2: rank 0 writes the directory, the others nothing."""

    def __init__(self, rank: int, rank1_read: Path):
        self.rank, self.rank1_read = rank, rank1_read

    def export(self, path: str) -> str | None:
        if self.rank != 0:
            return None
        deadline = time.monotonic() + SLOW_EXPORT_S
        while not self.rank1_read.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        Path(path, WEIGHTS).write_text(f"step {STEP}")
        return path


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from wmss_ray.training import rank_loop

    rank1_read = Path(out, "rank1_read")

    def validate_on_ranks(cfg, points, model_dir, step, rank, world, device):  # what each rank loaded
        seen = Path(model_dir, WEIGHTS).read_text()
        if rank == 1:
            rank1_read.touch()
        gathered = [None] * world
        dist.all_gather_object(gathered, seen)  # collective, as the real one
        return {"seen": gathered, "step": step}

    rank_loop.validate_on_ranks = validate_on_ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if dist.is_initialized():  # forked from a session whose own tests made a 1-rank group
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        spec = SimpleNamespace(out_dir=out, validation=None)
        metrics = rank_loop.validate_in_run(_SlowExport(rank, rank1_read), None, spec, STEP, rank, world, "cpu")
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_every_rank_validates_the_model_rank_0_is_still_exporting(tmp_path):
    from wmss_ray.training.rank_loop import INTERIM_MODEL  # imported here, before the ranks fork

    (tmp_path / INTERIM_MODEL).mkdir()
    (tmp_path / INTERIM_MODEL / WEIGHTS).write_text("step 0")  # the previous validation point's model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks start with the modules this process has imported (spawn re-imports them:
    # most of the test's time on a loaded machine)
    mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"seen": [f"step {STEP}"] * 2, "step": STEP}
