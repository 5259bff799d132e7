"""A rerun with new settings recomputes; a rerun after a crash resumes (the stale-resume rule).

Each test builds a run directory next to the session's tiny run (``tiny_job_run``): the phases
it does not rerun are links to that run's, the phase under test is a copy (with its Ray Train
checkpoints, metrics and model), and the config changes one setting. Before the rule, such a
rerun resumed the old run's final checkpoint, trained zero steps and reported the old model.
The rule for every phase, with stand-in phase bodies: tests/test_pipeline_resume.py (SFT after a
change of ``training.lr`` included); here it is proved on real Ray Train runs for ``wmss_1``,
which trains through the same ``train_phase`` as ``sft`` and ``sft_continued``, and on a real
scoring run. Three Train runs in all: each costs ~13 s of worker-group start-up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from wmss_ray.config.loading import config_from_dict
from wmss_ray.pipeline import run_pipeline
from wmss_ray.training.trainer import FAULT_ENV

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(tiny_job_run, ray_cluster):
    if tiny_job_run.status != "SUCCEEDED":
        pytest.fail(f"the tiny pipeline job ended {tiny_job_run.status}:\n{tiny_job_run.logs[-4000:]}")
    return tiny_job_run.cfg


def _clone(base, tmp: Path, name: str, link: tuple[str, ...], copy: tuple[str, ...], overrides: list[str]):
    """A config with ``overrides`` whose run dir links ``link`` and copies ``copy`` from the base run."""
    cfg = config_from_dict(base.to_dict(), [f"run.storage={tmp}", f"run.name={name}", *overrides])
    src, dst = Path(base.run_dir()).resolve(), Path(cfg.run_dir())
    dst.mkdir(parents=True)
    for phase in link:
        os.symlink(src / phase, dst / phase, target_is_directory=True)
    for phase in copy:
        shutil.copytree(src / phase, dst / phase, symlinks=True)
    return cfg


def _losses(phase_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]


def _starts(phase_dir: Path) -> list[int]:
    lines = [json.loads(line) for line in (phase_dir / "workers.jsonl").read_text().splitlines()]
    return [r["start_step"] for r in lines if r["event"] == "start"]


UP_TO_CURRICULUM = ("data", "phase0", "tokenize", "sft", "score_1", "curriculum_1")


@pytest.fixture(scope="module")
def lam09(base, tmp_path_factory):
    """The tiny run's WMSS phase rerun with mix.lam 0.9 in a copy of its directory: ``(cfg, losses)``.

    With a checkpoint every step and no retries (how a run is executed, in no fingerprint: the
    linked SFT of the base run, which checkpointed never, is this run's too), so that the killed
    rerun of the same inputs below resumes from step 1 of this very directory."""
    tmp = tmp_path_factory.mktemp("rerun")
    cfg = _clone(base, tmp, "lam09", UP_TO_CURRICULUM, ("wmss_1",),
                 ["mix.lam=0.9", "training.checkpoint_every=1", "training.max_failures=0"])
    wmss = Path(cfg.run_dir()) / "wmss_1"
    assert list((wmss / "ray_train").glob("checkpoint_*")), "the copy holds the lambda-0.5 run's checkpoints"
    run_pipeline(cfg, until="wmss_1")
    return cfg, _losses(wmss)


def test_a_rerun_with_another_lam_trains_every_step_from_0(base, lam09):
    cfg, losses = lam09
    wmss = Path(cfg.run_dir()) / "wmss_1"
    old = _losses(Path(base.run_dir()) / "wmss_1")
    assert _starts(wmss) == [0] * cfg.scaling.num_workers  # not step 2 of the lambda-0.5 run
    assert len(losses) == len(old) == base.training.max_steps and losses != old
    man = json.loads((wmss / "manifest.json").read_text())
    assert man["status"] == "completed" and man["counts"]["steps"] == len(losses)


def test_from_retrains_every_step_and_a_killed_run_of_the_same_inputs_resumes_with_equal_losses(
        lam09, capsys, monkeypatch):
    """``--from`` on the completed lambda-0.9 phase clears it (its checkpoints of step 1 and 2 are
    of the same inputs: only --from empties them) and retrains from step 0; that run is killed
    after step 1 (checkpointed), and the next run of the same inputs resumes there, not from 0.
    The losses of every step are bit for bit the uninterrupted run's. (One Train run fewer than
    a --from rerun and a killed rerun in two directories: the kill comes after --from's start.)"""
    cfg, losses = lam09
    wmss = Path(cfg.run_dir()) / "wmss_1"
    monkeypatch.setenv(FAULT_ENV, "0:1")  # rank 0 SIGKILLs itself after step 1 (checkpointed)
    with pytest.raises(Exception, match="TrainingFailed|failed"):
        run_pipeline(cfg, from_phase="wmss_1", until="wmss_1")
    assert "phase wmss_1: cleared" in capsys.readouterr().out
    assert json.loads((wmss / "manifest.json").read_text())["status"] == "failed"
    monkeypatch.delenv(FAULT_ENV)
    run_pipeline(cfg, until="wmss_1")
    assert _starts(wmss) == [0, 1]  # --from started at 0 (not after step 2), then the resume
    assert _losses(wmss) == losses  # bit for bit the uninterrupted run's


def test_scoring_reruns_after_a_change_of_the_scoring_model(base, tmp_path):
    weak = str(Path(base.run_dir()).resolve() / "wmss_1" / "model")  # another weak agent than M0
    cfg = _clone(base, tmp_path, "weak", ("data", "phase0", "tokenize", "sft"), ("score_1",),
                 [f"models.weak={weak}"])
    score = Path(cfg.run_dir()) / "score_1"
    (score / "stale-part.parquet").write_bytes(b"left by another run")
    out = run_pipeline(cfg, until="score_1")
    assert not (score / "stale-part.parquet").exists()
    new = pq.read_table(out["score_1"]["scores"]).to_pandas()
    old = pq.read_table(Path(base.run_dir()) / "score_1" / "scores.parquet").to_pandas()
    assert list(new["sample_id"]) == list(old["sample_id"])
    assert (new["h_strong"] == old["h_strong"]).all()  # the same M1, the same batches
    assert (new["h_weak"] != old["h_weak"]).any()
