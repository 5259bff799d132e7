"""``train_phase`` on a real local Ray cluster with 2 DeepSpeed workers (gloo, CPU): what Ray
Train adds around the rank loop. Logs, checkpoints and the export of a run; the controller's
imports; a stop, a resume and a SIGKILLed worker restored from Ray Train's checkpoint.

Each run is compared with the single-process plain-torch reference of ``test_training_units``
(same data order, AdamW, schedule): the loss and gradient-norm trajectories must match, which
holds only if the loss is divided by the global answer-token count and DeepSpeed's rank and
micro-batch averaging is undone exactly. Runs are module-scoped and shared between tests. The
step's exactness at ZeRO-2/3 and with packing is checked on 2 forked ranks without Ray Train
(``test_rank_loop.py``: the same rank loop, without a worker group's start-up per run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.training.controller_probe import ControllerImports
from tests.training.forked_ranks import train_on_forked_ranks
from tests.training.test_training_units import (
    TWO_WORKER_STEPS as STEPS,
    assert_same_weights,
    assert_trajectory,
    load_hf,
    make_artifacts,
    reference_run,
    two_worker_cfg,
)
from wmss_ray.io.files import read_metrics
from wmss_ray.training.metrics import METRIC_KEYS
from wmss_ray.training.rank_loop import INTERIM_MODEL
from wmss_ray.training.trainer import FAULT_ENV, train_phase

pytestmark = [pytest.mark.integration, pytest.mark.slow]

@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("ray_art"))


@pytest.fixture(scope="module")
def sft_zero0(ray_cluster, art, tmp_path_factory):
    staging = tmp_path_factory.mktemp("staging") / "ckpt"  # made by the workers, where they stage
    cfg = two_worker_cfg(0, staging_dir=str(staging))
    probe = tmp_path_factory.mktemp("probe") / "controller.json"
    res = train_phase(cfg, "sft", art["strong"], None, art["tokenized"], None,
                      str(tmp_path_factory.mktemp("sft_z0")), callbacks=[ControllerImports(str(probe))])
    return cfg, res, json.loads(probe.read_text())


def test_sft_zero0_matches_reference_logs_and_exports(sft_zero0, art):
    cfg, res, _ = sft_zero0
    assert res.steps == res.total_steps == STEPS
    metrics = read_metrics(res.metrics_path)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert set(METRIC_KEYS) <= set(metrics[0]) and metrics[0]["phase"] == "sft"
    assert res.final_metrics == metrics[-1]
    assert metrics[-1]["samples_seen"] == STEPS * 8 and metrics[0]["tokens_per_s"] > 0
    ref = reference_run(art, cfg, "sft", "sft", STEPS)
    assert_trajectory(metrics, ref)
    assert any(Path(res.metrics_path).parent.joinpath("tb").glob("events.out.tfevents.*"))
    staging = Path(cfg.training.staging_dir)  # training.staging_dir: checkpoints staged there, then removed
    assert staging.is_dir() and not any(staging.iterdir())
    # The export loads in plain transformers, equals the reference's weights, and equals the
    # final checkpoint's module weights exactly.
    exported = load_hf(res.model_dir)
    assert_same_weights(ref["strong"].state_dict(), exported)
    ckpt = torch.load(Path(res.checkpoint_path, "ds", "mp_rank_00_model_states.pt"), weights_only=False)
    sd = exported.state_dict()
    for key, value in ckpt["module"].items():
        assert torch.equal(value, sd[key.removeprefix("strong.")]), key
    assert Path(res.checkpoint_path).name == f"checkpoint_{STEPS:06d}"


def test_sft_twice_gives_bit_identical_weights(sft_zero0, art, tmp_path):
    """Same seed, same config, same machine: a second SFT run exports the same weights bit for bit
    and logs the same losses and gradient norms. The second run is the same rank loop on 2
    forked ranks without Ray Train, so this also shows that the Ray edge (worker group, report,
    checkpoint upload) changes nothing in what is trained."""
    cfg, first, _ = sft_zero0
    again = train_on_forked_ranks(cfg, "sft", art["strong"], None, art["tokenized"], None, str(tmp_path / "again"))
    from safetensors.torch import load_file

    wa = load_file(str(Path(first.model_dir) / "model.safetensors"))
    wb = load_file(str(Path(again.model_dir) / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = read_metrics(first.metrics_path), read_metrics(again.metrics_path)
    assert [(m["loss"], m["grad_norm"]) for m in ma] == [(m["loss"], m["grad_norm"]) for m in mb]


def test_the_controller_of_a_run_never_imports_torch_transformers_or_deepspeed(sft_zero0):
    """Ray Train's controller unpickles the train function, its config and the backend config:
    all are light (``training/ray_worker.py``, ``training/backend.py``), so the models' and
    tensors' libraries load on the workers only (before, transformers and deepspeed loaded in the
    controller of every run, and torch through Ray's ``TorchConfig``: CPU-s and memory per run)."""
    assert sft_zero0[2] == {"heavy": []}


def test_a_run_starts_no_ray_dataset_actor(sft_zero0):
    """Ray Train V2 starts a ``DatasetManager`` actor for every run, datasets or not; our ranks read
    their own rows, so ``train_phase`` leaves it out (``trainer._trainer_class``): one process
    fewer per run. Ray's State API lists the session's actors, dead ones included."""
    import ray
    from ray.util.state import list_actors

    def actors(cls):
        return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", cls)],
                           limit=1000, timeout=30, raise_on_missing_output=False)

    assert actors("TrainController"), "the State API sees no run at all"
    assert not actors("DatasetManager")


@pytest.fixture(scope="module")
def interrupted(ray_cluster, art, tmp_path_factory):
    """WMSS frozen, ZeRO-0: stopped after step 2, resumed by a second call in which rank 1
    SIGKILLs itself after step 5 (once); Ray Train replaces the group and resumes again."""
    out = str(tmp_path_factory.mktemp("interrupted"))
    cfg = two_worker_cfg(0, max_failures=1)
    args = (cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"], out)
    first = train_phase(*args, mode="frozen", stop_after=2, export_at_stop=True)
    os.environ[FAULT_ENV] = "1:5"
    try:
        second = train_phase(*args, mode="frozen")
    finally:
        del os.environ[FAULT_ENV]
    return cfg, first, second, out


def _worker_events(out: str) -> list[dict]:
    with open(os.path.join(out, "workers.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_stop_and_resume_reproduces_uninterrupted_run(interrupted, art):
    cfg, first, second, out = interrupted
    assert first.steps == 2 and first.model_dir is None
    assert Path(first.checkpoint_path).name == "checkpoint_000002"
    assert second.steps == STEPS and second.model_dir is not None
    metrics = read_metrics(second.metrics_path)  # one line per step, across all attempts
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    ref = reference_run(art, cfg, "wmss", "frozen", STEPS)
    assert_trajectory(metrics, ref)
    assert_same_weights(ref["strong"].state_dict(), load_hf(second.model_dir))


def test_export_at_stop_exports_the_model_of_the_stop_step(interrupted, art):
    """What a tune trial evaluates between chunks is the strong model after exactly that step."""
    cfg, first, _, out = interrupted
    ref = reference_run(art, cfg, "wmss", "frozen", 2)
    assert_same_weights(ref["strong"].state_dict(), load_hf(os.path.join(out, INTERIM_MODEL)))


def test_sigkilled_worker_is_replaced_and_resumes_from_checkpoint(interrupted):
    _, _, second, out = interrupted
    killed_pid = int(Path(out, ".fault_injected").read_text())
    starts = [e for e in _worker_events(out) if e["event"] == "start"]
    assert [e["start_step"] for e in starts[:4]] == [0, 0, 2, 2]
    # after the kill: a new group (new processes) resumed from the last checkpoint (2 or 4)
    restarted = starts[4:]
    assert len(restarted) == 2 and {e["rank"] for e in restarted} == {0, 1}
    assert restarted[0]["start_step"] == restarted[1]["start_step"] in (2, 4)
    assert killed_pid not in {e["pid"] for e in restarted}
    ends = [e for e in _worker_events(out) if e["event"] == "end"]
    assert {e["end_step"] for e in ends} == {2, STEPS}
    assert Path(second.checkpoint_path).name == f"checkpoint_{STEPS:06d}"
