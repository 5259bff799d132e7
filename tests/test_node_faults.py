"""What real clusters do to a run, on a simulated multi-node cluster (``ray.cluster_utils.Cluster``:
a head with no CPUs and 1-CPU worker nodes, all on this machine): a node drained for preemption,
a node lost under a Train worker, under a weak-pool actor, under a scoring actor, and the driver
(the head's job) lost mid-phase then rerun against the same storage, whose driver then gets SIGTERM.

Every training run here is frozen WMSS on 2 Train workers (gloo, ZeRO-0) and is compared with the
single-process plain-torch reference (``test_training_units.reference_run``): one metrics line per
step, the same losses and gradient norms, and a last checkpoint whose ``segments`` show each step
trained exactly once. A run pauses after a chosen step (``trainer.PAUSE_ENV``, every rank, before
its stop poll) so the test can drain or remove a node while the phase is mid-run.

This module connects this process to its own cluster, so conftest schedules its group first (it
must not share the process's Ray with the session's ``ray_cluster``) and it shuts Ray down after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import cluster_probes as probe
from tests.training.test_training_units import (
    TWO_WORKER_STEPS as STEPS,
    assert_trajectory,
    make_artifacts,
    reference_run,
    tiny_cfg,
)
from wmss_ray.io.files import read_metrics
from wmss_ray.training.rank_loop import PAUSE_RELEASE
from wmss_ray.training.stopping import StopRequested
from wmss_ray.training.trainer import PAUSE_ENV, checkpoint_states, train_phase

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
#: How long the ranks wait after the paused step: the test acts in that window (a drain is seen by
#: Ray Train's watcher within its 0.2 s poll here, a removed node within a health check).
PAUSE_S = 120.0  # at most: each test releases the run (``_release``) once it has acted
#: Ray Train's preemption watcher is off in the rest of the test session (conftest); on here.
CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.2",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster(ray_temp_dir):
    """Head (0 CPUs: the driver, Ray Train's controller) + worker nodes of 1 CPU each (``_nodes``)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # conftest orders this group first; a caller's own Ray is not ours
        ray.shutdown()
    temp_dir = ray_temp_dir("wmss-mn-")
    # Cluster() writes the head's address to <RAY_TMPDIR or /tmp>/ray/ray_current_cluster (and
    # its shutdown deletes that file): on a fresh machine /tmp/ray does not exist (CI: every test
    # here errored with FileNotFoundError), and elsewhere it is the machine's own Ray's file,
    # which `ray.init("auto")` reads. So this cluster's address file lives in its own temp dir.
    os.makedirs(os.path.join(temp_dir, "ray"))
    env_vars = {**CLUSTER_ENV, "RAY_TMPDIR": temp_dir}
    saved = {k: os.environ.get(k) for k in env_vars}
    # The raylets (and so every worker) inherit it, and Ray Train hands the driver's own
    # RAY_TRAIN_* to its controller: set for as long as the module runs.
    os.environ.update(env_vars)
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": temp_dir,
            "include_dashboard": False,
            # a SIGKILLed node is declared dead after ~1.5 s of missed health checks, not ~30 s
            "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                               "health_check_failure_threshold": 3}})
        # Ray's own helper actors (Train's placement-group cleaner) find "their" cluster from
        # RAY_ADDRESS, else the newest on the machine: other test sessions run theirs here too.
        env = {**CLUSTER_ENV, "RAY_ADDRESS": c.address}
        ray.init(address=c.address, logging_level="WARNING", runtime_env={"env_vars": env})
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("node_faults_art"))


@pytest.fixture(scope="module")
def reference(art):
    """The uninterrupted run's per-step losses and gradient norms (plain torch, one process)."""
    return reference_run(art, _cfg(), "wmss", "frozen", STEPS)


def _cfg(**training):
    cfg = tiny_cfg(zero_stage=0, wmss_epochs=1.5, max_steps=STEPS, num_workers=2,
                   **{"checkpoint_every": 1000, "max_failures": 0, "max_preemption_failures": 0, **training})
    cfg.mix.mode = "frozen"
    return cfg


def _nodes(cluster, n: int) -> None:
    """Bring the cluster to ``n`` live 1-CPU worker nodes (in the main thread: a node's start
    installs a signal handler). A test asks for one more than its run needs: the spare that a
    real cluster's autoscaler or node pool brings up for the node it loses."""
    while len(cluster.worker_nodes) < n:
        cluster.add_node(num_cpus=1)


def _train(cfg, art, out: Path):
    return train_phase(cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"], str(out))


def _release(out: Path) -> None:
    """Let the paused ranks go on (``rank_loop.PAUSE_RELEASE``): the test has acted."""
    (out / PAUSE_RELEASE).write_text("")


class Paused:
    """``with Paused(step):`` every rank waits after ``step`` until the test acts and releases it
    (``_release``; at most ``PAUSE_S``): a fixed sleep lost the race under load (the run finished
    before a loaded machine's State API named the node to remove)."""

    def __init__(self, step: int):
        self.step = step

    def __enter__(self):
        os.environ[PAUSE_ENV] = f"{self.step}:{PAUSE_S}"

    def __exit__(self, *exc):
        del os.environ[PAUSE_ENV]


def _node(cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def _assert_every_step_once(out: Path, res, reference, segments: list[list[int]]) -> None:
    metrics = read_metrics(res.metrics_path)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # none lost, none repeated
    assert_trajectory(metrics, reference)
    _, last = max(checkpoint_states(str(out)), key=lambda ws: ws[1]["step"])
    assert last["step"] == STEPS and last["segments"] == segments


def test_a_drained_node_gets_a_just_in_time_checkpoint_and_the_run_resumes_from_it(cluster, art, reference,
                                                                                  tmp_path):
    """checkpoint_every is far away; the node of rank 1 is drained for preemption after step 2
    (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``, 8 s deadline) and killed at its
    deadline; a spare node is up. The ranks checkpoint the step they are at (2: they wait after it
    until both Train workers hold the drain, ``probe.told_of_drain``) at once and wait; Ray Train
    restarts them from it on the preemption budget (max_failures is 0)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    out = tmp_path / "out"
    drained: dict = {}

    def drain_then_reclaim():
        probe.wait_for(lambda: probe.logged(out, 2), "step 2")
        rank1_pid = next(e["pid"] for e in probe.events(out) if e["event"] == "start" and e["rank"] == 1)
        node_id = probe.actor_nodes("RayTrainWorker")[rank1_pid]
        gcs = ray._raylet.GcsClient(address=cluster.address)
        deadline = time.time() + 8
        ok, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                 "test: spot reclaim", int(deadline * 1000))
        assert ok, why
        # Ray Train's preemption watcher tells the workers; then they go on to poll (from step 2)
        probe.wait_for(lambda: probe.told_of_drain(int(deadline * 1000)) == {0, 1}, "the workers' preemption signal",
                  timeout_s=60)
        _release(out)
        # step 2: the ranks waited after it until both workers held the drain
        drained["step"] = probe.wait_for(lambda: probe.stop_step(out), "the ranks' stop", timeout_s=90)
        probe.wait_for(lambda: probe.registered(out, drained["step"]), "the just-in-time checkpoint", timeout_s=90)
        # The reclaim, at its deadline: Ray counts a drained node that dies *before* its deadline
        # as an unexpected failure (max_failures), one that dies after it as a preemption.
        time.sleep(max(0.0, deadline + 0.5 - time.time()))
        cluster.remove_node(_node(cluster, node_id), allow_graceful=False)

    _nodes(cluster, 3)
    with Paused(2):
        t = probe.in_thread(drain_then_reclaim)
        res = _train(_cfg(max_preemption_failures=1), art, out)
    probe.joined(t)
    k = drained["step"]
    assert k == 2 < STEPS  # mid-phase: neither a periodic checkpoint (every 1000) nor the end
    _assert_every_step_once(out, res, reference, [[0, k], [k, STEPS]])
    stops = [e for e in probe.events(out) if e["event"] == "stop"]
    assert {(e["rank"], e["reason"], e["step"]) for e in stops} == {(0, "preemption", k), (1, "preemption", k)}
    restarted = [e for e in probe.events(out) if e["event"] == "start"][2:]
    assert sorted(e["start_step"] for e in restarted) == [k, k]


def test_losing_the_node_of_a_train_worker_resumes_from_the_last_checkpoint(cluster, art, reference, tmp_path):
    """No drain, no warning: rank 1's node is removed after step 3 (the last checkpoint is step 2);
    Ray Train restarts the group on the replacement node (max_failures 1) from step 2."""
    out = tmp_path / "out"

    def lose_rank1_node():
        probe.wait_for(lambda: probe.logged(out, 3), "step 3")
        # the controller restores only checkpoints it has registered: under load that can lag the
        # rank's report, and a node lost before it restarts the run from step 0 (CI, once)
        probe.wait_for(lambda: probe.registered(out, 2), "checkpoint 2 registered", timeout_s=90)
        rank1_pid = next(e["pid"] for e in probe.events(out) if e["event"] == "start" and e["rank"] == 1)
        node_id = probe.actor_nodes("RayTrainWorker")[rank1_pid]
        cluster.remove_node(_node(cluster, node_id), allow_graceful=False)
        # released only once rank 1 is gone: a worker outlives its killed raylet for a moment,
        # and a rank released then trains step 4 and checkpoints it (CI, once: resumed from 4)
        probe.wait_for(lambda: probe.gone(rank1_pid), "rank 1's process to end", timeout_s=60)
        _release(out)

    _nodes(cluster, 3)
    with Paused(3):
        t = probe.in_thread(lose_rank1_node)
        res = _train(_cfg(checkpoint_every=2, max_failures=1), art, out)
    probe.joined(t)
    _assert_every_step_once(out, res, reference, [[0, 2], [2, STEPS]])


def test_losing_the_node_of_a_weak_pool_actor_replaces_the_replica_and_loses_no_step(cluster, art, reference,
                                                                                    tmp_path):
    """mix.placement pool, 1 replica: its node is removed after step 2; Ray re-places the
    replica's placement group on a new node and restarts it, the request in flight is retried
    (the weak model is frozen: the same reply), the Train workers never notice."""
    out = tmp_path / "out"
    cfg = _cfg()
    cfg.mix.placement = "pool"
    cfg.mix.pool.top_k, cfg.mix.pool.replicas, cfg.mix.pool.shards, cfg.mix.pool.cpus_per_actor = 0, 1, 1, 0.5
    _nodes(cluster, 4)  # the pool takes half a node, each Train worker a whole one, + the spare
    lost: dict = {}

    def lose_pool_node():
        probe.wait_for(lambda: probe.logged(out, 2), "step 2")
        (node_id,) = set(probe.actor_nodes("ReplicaCoordinator").values())
        assert node_id not in set(probe.actor_nodes("RayTrainWorker").values())
        cluster.remove_node(_node(cluster, node_id), allow_graceful=False)
        lost["node"] = node_id
        _release(out)

    with Paused(2):
        t = probe.in_thread(lose_pool_node)
        res = _train(cfg, art, out)
    probe.joined(t)
    _assert_every_step_once(out, res, reference, [[0, STEPS]])  # no restart of the Train workers
    assert lost


def test_losing_the_node_of_a_scoring_actor_gives_one_score_per_sample(cluster, art, tmp_path):
    """One scoring actor, batches of 2 rows: its node is removed after the first scores arrive;
    Ray Data restarts the actor elsewhere and retries its batches: every sample scored once,
    equal to a single-process scorer."""
    import numpy as np

    from wmss_ray.stages.score import score_tokenized
    from wmss_ray.stages.scorer import EntropyScorer

    cfg = _cfg()
    cfg.scoring.num_actors, cfg.scoring.batch_size, cfg.scoring.cpus_per_actor = 1, 2, 1
    _nodes(cluster, 3)  # the actor, Ray Data's read tasks, the spare
    lost: dict = {}

    def lose_scorer_node():
        (node_id,) = set(probe.actor_nodes("EntropyScorer").values())
        cluster.remove_node(_node(cluster, node_id), allow_graceful=False)
        lost["node"] = node_id

    progress: list[int] = []
    threads: list[threading.Thread] = []

    def on_progress(done: int) -> None:
        progress.append(done)
        if not threads:
            threads.append(probe.in_thread(lose_scorer_node))

    res = score_tokenized(cfg, art["weak"], art["strong"], art["tokenized"], str(tmp_path / "score"),
                          progress_callback=on_progress)
    probe.joined(threads[0])
    assert lost and progress[0] < 40
    scores = pq.read_table(res.scores_path)
    rows = pq.read_table(art["tokenized"]).to_pylist()
    assert sorted(scores["sample_id"].to_pylist()) == sorted(r["sample_id"] for r in rows)  # each once
    scorer = EntropyScorer(art["weak"], art["strong"])
    ref = {r["sample_id"]: scorer.score_rows([r["input_ids"]], [r["labels"]]) for r in rows}
    got = scores.to_pylist()
    np.testing.assert_allclose([g["h_weak"] for g in got], [ref[g["sample_id"]]["h_weak"][0] for g in got], atol=1e-5)
    np.testing.assert_allclose([g["h_strong"] for g in got], [ref[g["sample_id"]]["h_strong"][0] for g in got],
                               atol=1e-5)


_DRIVER = """
import json, sys
from tests.test_node_faults import _cfg
from wmss_ray.training.trainer import train_phase
art, out = json.loads(sys.argv[1])
cfg = _cfg(checkpoint_every=4)  # the reruns' config: the same fingerprint
train_phase(cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"], out)
"""


def test_the_head_lost_then_the_driver_evicted_each_rerun_resumes_from_storage(cluster, art, reference, tmp_path):
    """The head's loss takes the job's driver with it: the driver process is SIGKILLed mid-phase
    after step 4 (checkpoint_every 4; its workers go with it) and the phase is rerun against the
    same directory (what a RayJob resubmission does): it resumes from step 4. (Killed there, not
    later, so that the rerun's first metrics line is its own: the test waits for its step 5.)
    That rerun's driver gets SIGTERM after step 5 (a pod eviction): the ranks save step 5 at once,
    ``train_phase`` raises StopRequested (the driver exits non-zero); the next rerun resumes."""
    out = tmp_path / "out"
    _nodes(cluster, 2)
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO), PAUSE_ENV: f"4:{PAUSE_S}"}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps([art, str(out)])], env=env, cwd=str(REPO))
    try:
        probe.wait_for(lambda: probe.registered(out, 4) or driver.poll() is not None, "checkpoint 4")
        assert driver.poll() is None, "the first driver ended before it was killed"
    finally:
        driver.kill()
        driver.wait()

    def sigterm_after_step_5():
        probe.wait_for(lambda: probe.logged(out, 5), "step 5")
        os.kill(os.getpid(), signal.SIGTERM)
        probe.wait_for(lambda: (out / ".stop_requested").exists(), "the driver's stop marker")
        _release(out)

    with Paused(5):
        t = probe.in_thread(sigterm_after_step_5)
        with pytest.raises(StopRequested, match="after step 5 of 6"):
            _train(_cfg(checkpoint_every=4), art, out)
    probe.joined(t)
    assert not (out / ".stop_requested").exists()
    res = _train(_cfg(checkpoint_every=4), art, out)
    _assert_every_step_once(out, res, reference, [[0, 4], [4, 5], [5, STEPS]])
    stops = {(e["rank"], e["reason"], e["step"]) for e in probe.events(out) if e["event"] == "stop"}
    assert stops == {(0, "stop", 5), (1, "stop", 5)}
