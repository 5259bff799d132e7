"""SIGKILL a scoring actor mid-run: the run finishes with exactly one score per sample, equal
to an uninterrupted single-process run.

Ray Data's actor-pool map restarts dead actors and retries their tasks by default in ray 2.60
(``max_restarts=-1``, ``max_task_retries=-1``); this test pins that behaviour down for our
scorer. The actor table is read from the GCS (``ray._private.state.actors``) because the state
API (``ray.util.state.list_actors``) needs the dashboard, which the test cluster does not run.
"""

from __future__ import annotations

import os
import signal
import threading

import pyarrow.parquet as pq
import pytest

from .conftest import tiny_cfg
from .test_score import _assert_matches_reference


def _alive_scorers() -> list[dict]:
    from ray._private.state import actors

    return [a for a in actors().values()
            if "EntropyScorer" in a["ActorClassName"] and a["State"] == "ALIVE" and a.get("Pid")]


@pytest.mark.integration
def test_killed_scorer_is_restarted_and_no_score_is_lost_or_doubled(tiny_world, tokenized_world, reference_scores,
                                                                     tmp_path):
    from ray._private.state import actors

    from wmss_ray.stages.score import score_tokenized

    # Many small batches (100 rows / 2) so most of the work is still ahead at the first output.
    # One actor is enough: the claim is about the killed one (restarted, its batch retried), and
    # with no other actor to take the rest every remaining batch waits for that restart.
    cfg = tiny_cfg("scoring.num_actors=1", "scoring.batch_size=2")
    killed: dict = {}
    progress: list[int] = []

    def kill_one() -> None:
        victim = _alive_scorers()[0]
        os.kill(victim["Pid"], signal.SIGKILL)
        killed.update(actor_id=victim["ActorID"], pid=victim["Pid"], done_at_kill=progress[-1])

    killer = threading.Thread(target=kill_one, daemon=True)

    def on_progress(done: int) -> None:
        progress.append(done)
        if not killer.is_alive() and not killed and len(progress) == 1:
            killer.start()  # once, right after the first block of scores arrives

    res = score_tokenized(cfg, tiny_world.weak, tiny_world.strong, tokenized_world.tokenized_path,
                          str(tmp_path), progress_callback=on_progress)
    killer.join()
    assert killed, "the kill never happened"
    assert killed["done_at_kill"] < 100  # it hit a run with work left
    _assert_matches_reference(pq.read_table(res.scores_path), reference_scores)
    assert actors()[killed["actor_id"]]["NumRestarts"] >= 1  # Ray restarted the killed scorer
