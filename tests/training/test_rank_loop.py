"""``rank_loop.run_rank`` on 2 ranks forked from the test process (plain ``torch.distributed``,
gloo on 127.0.0.1, no Ray).

The validation point: every rank validates the model just exported. Rank 0 alone writes
``interim_model/``; the other ranks read it right after. Here rank 0's export is slow (it starts
writing only once rank 1 has read the directory, or after 2 s) and ``interim_model/`` still holds
the previous validation point's model, so a rank that does not wait for the export validates the
previous model. What a rank reads stands in for the model (``validate_on_ranks`` itself, the real
evaluator on 2 ranks, is ``test_validation.py``'s).

The step on 2 DeepSpeed ranks (``forked_ranks.train_on_forked_ranks``: the rank loop Ray Train's
workers run, without a worker group's start-up per run) against the single-process plain-torch
reference of ``test_training_units`` (same data order, AdamW, schedule): the loss and
gradient-norm trajectories and the exported weights must match, which holds only if the loss is
divided by the global answer-token count and DeepSpeed's rank and micro-batch averaging is undone
exactly. Ray Train's own part (start-up, logs, restore after a stop or a SIGKILL) is
``test_training_ray.py``'s.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.training import forked_ranks
from tests.training.forked_ranks import RankFailed, drop_inherited_groups, train_on_forked_ranks
from tests.training.test_training_units import (
    TWO_WORKER_STEPS as STEPS,
    assert_same_weights,
    assert_trajectory,
    load_hf,
    make_artifacts,
    reference_run,
    tiny_cfg,
    two_worker_cfg,
)
from wmss_ray.io.files import read_metrics

STEP = 3  # the validation point's step
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
    drop_inherited_groups()  # forked from a session whose own tests made a 1-rank group
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


# ----------------------------------------------------------------------------- the step on 2 DeepSpeed ranks


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("ranks_art"))


@pytest.fixture(scope="module")
def art_tied(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("ranks_art_tied"), tie=True)


def test_a_failed_rank_fails_the_run_with_its_exit_code_and_traceback(art, tmp_path, monkeypatch):
    """The helper's own contract: rank 1 raises while rank 0 waits for it (as in a collective);
    the run ends, naming rank 1, its exit code and its traceback, and rank 0 is not left waiting."""
    import threading

    def run_rank(cfg, spec, rank, world, device, *, report):  # the forked ranks inherit this patch
        if rank == 1:
            raise RuntimeError("rank 1 broke")
        threading.Event().wait()  # never returns: only the helper's kill ends this rank

    monkeypatch.setattr(forked_ranks, "run_rank", run_rank)
    with pytest.raises(RankFailed, match=r"(?s)rank1 \(pid \d+\) exited with code 1:.*RuntimeError: rank 1 broke"):
        train_on_forked_ranks(two_worker_cfg(0), "sft", art["strong"], None, art["tokenized"], None, str(tmp_path))


def test_ranks_that_hang_are_killed_with_every_rank_s_stacks_and_retried_once_if_they_wrote_nothing(
        art, tmp_path, monkeypatch):
    """The helper's hang guard: ranks stuck past the deadline dump their stacks (every rank's, in the
    error) and are killed; a hang before the ranks wrote anything is retried once, with a warning
    (the fork of a threaded test process, not the code under test); a second hang raises."""
    import threading

    real_run, real_fork, attempts = forked_ranks.run_rank, forked_ranks._fork_ranks, []

    def run_rank(cfg, spec, rank, world, device, *, report):  # the forked ranks inherit this patch
        if os.environ["WMSS_TEST_HANG"] == "1":
            threading.Event().wait()  # a hang: only the helper's kill ends this rank
        return real_run(cfg, spec, rank, world, device, report=report)

    def fork_ranks(cfg, spec, latest):  # each attempt: hang (cut at 3 s), or train for real (not cut short)
        hang = not attempts or "twice" in spec.out_dir
        attempts.append(hang)
        monkeypatch.setattr(forked_ranks, "RANK_DEADLINE_S", 3 if hang else 240)
        monkeypatch.setenv("WMSS_TEST_HANG", "1" if hang else "0")
        return real_fork(cfg, spec, latest)

    monkeypatch.setattr(forked_ranks, "run_rank", run_rank)
    monkeypatch.setattr(forked_ranks, "_fork_ranks", fork_ranks)
    stacks = r"(?s)hung before writing anything; retried once.*rank0.*in run_rank.*rank1.*in run_rank"
    with pytest.warns(UserWarning, match=stacks):
        res = train_on_forked_ranks(two_worker_cfg(0), "sft", art["strong"], None, art["tokenized"], None,
                                    str(tmp_path / "once"))
    assert res.steps == res.total_steps and attempts == [True, False]
    with pytest.warns(UserWarning, match=stacks), pytest.raises(forked_ranks.RanksHung,
                                                               match=r"(?s)still running after 3 s.*rank0.*rank1"):
        train_on_forked_ranks(two_worker_cfg(0), "sft", art["strong"], None, art["tokenized"], None,
                              str(tmp_path / "twice"))


def test_ranks_that_never_join_their_group_are_cut_at_the_join_deadline(art, tmp_path, monkeypatch):
    """A hang in the rendezvous (where CI's two hangs were) is cut at ``JOIN_DEADLINE_S``, not after
    the run's deadline, with every rank's stacks, and retried once like any hang before the ranks
    wrote anything; a second one raises."""
    import threading

    import torch.distributed as dist

    real_init = dist.init_process_group

    def init_process_group(*args, **kw):  # the forked ranks inherit this patch
        if os.environ.get("WMSS_TEST_HANG_JOIN") == "1":
            threading.Event().wait()  # a hang: only the helper's kill ends this rank
        return real_init(*args, **kw)

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WMSS_TEST_HANG_JOIN", "1")
    monkeypatch.setattr(forked_ranks, "JOIN_DEADLINE_S", 2)
    cut = r"(?s)not all in their process group after 2 s.*rank0.*in init_process_group.*rank1.*in init_process_group"
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="retried once"), pytest.raises(forked_ranks.RanksHung, match=cut):
        train_on_forked_ranks(two_worker_cfg(0), "sft", art["strong"], None, art["tokenized"], None, str(tmp_path))
    assert time.monotonic() - t0 < forked_ranks.RANK_DEADLINE_S  # two cuts at 2 s, not at 240


def _joint(stage: int, paths: dict, out: str, **kw):
    cfg = two_worker_cfg(stage, weak_lr=1e-3, **kw)
    return cfg, train_on_forked_ranks(cfg, "wmss", paths["strong"], paths["weak"], paths["tokenized"],
                                      paths["sampled"], out, mode="joint")


@pytest.fixture(scope="module")
def joint_zero3(art_tied, tmp_path_factory):
    """WMSS joint at ZeRO-3 with tied embeddings, padded: checked against the reference below and
    the padded side of the packing test (one run for both)."""
    return _joint(3, art_tied, str(tmp_path_factory.mktemp("joint_z3")))


@pytest.mark.parametrize("stage", [2, 3])
def test_wmss_joint_on_2_ranks_matches_reference_under_zero(art, art_tied, tmp_path, stage, request):
    """Stage 2 (untied) and stage 3 (tied embeddings: the head is the embedding matrix, gathered
    as an external parameter of the pair module) give the reference trajectory."""
    paths = art if stage == 2 else art_tied
    cfg, res = _joint(2, art, str(tmp_path / "out")) if stage == 2 else request.getfixturevalue("joint_zero3")
    assert res.steps == res.total_steps == STEPS
    metrics = read_metrics(res.metrics_path)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    ref = reference_run(paths, cfg, "wmss", "joint", STEPS)
    assert_trajectory(metrics, ref)
    assert all(m["phase"] == "wmss" and 0 < m["nontarget_ratio"] for m in metrics)
    exported = load_hf(res.model_dir)
    assert_same_weights(ref["strong"].state_dict(), exported)
    if stage == 3:  # the gathered export equals DeepSpeed's own consolidation of the fp32 shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(res.checkpoint_path, tag="ds")
        sd = exported.state_dict()
        assert any(key.startswith("strong.") for key in full)
        for key, value in full.items():
            if key.startswith("strong."):
                assert torch.equal(value, sd[key.removeprefix("strong.")]), key


def test_packed_wmss_joint_zero3_on_2_ranks_matches_the_padded_reference(joint_zero3, art_tied, tmp_path):
    """Packing on 2 ranks at ZeRO-3 (mix on, tied embeddings): per-step losses and gradient
    norms equal the padded run's within 1e-5, and follow the full-batch reference."""
    padded_cfg, padded_res = joint_zero3
    assert not padded_cfg.training.packing
    cfg, packed_res = _joint(3, art_tied, str(tmp_path / "packed"), packing=True)
    runs = {False: (padded_res, read_metrics(padded_res.metrics_path)),
            True: (packed_res, read_metrics(packed_res.metrics_path))}
    for key in ("loss", "ce_strong", "grad_norm", "n_tokens", "p_mix"):
        padded, packed = ([m[key] for m in runs[p][1]] for p in (False, True))
        assert np.allclose(packed, padded, rtol=1e-5, atol=1e-7), (key, padded, packed)
    ref = reference_run(art_tied, cfg, "wmss", "joint", STEPS)
    assert_trajectory(runs[True][1], ref)
    assert_same_weights(ref["strong"].state_dict(), load_hf(runs[True][0].model_dir))


@pytest.mark.parametrize("source, packing", [("entropy_matched", False), ("shuffled", True), ("uniform", False)])
def test_fake_weak_sides_are_the_same_on_2_ranks_and_on_1(art, tmp_path, source, packing):
    """``mix.weak_source`` through the workers: entropy_matched's spikes are keyed by the global
    micro-batch (``a * W + r``), shuffled's partners by row, so 2 ranks x 1 micro-batch and 1 rank
    x 2 micro-batches (the same global batch, the same rows per micro-batch; shuffled: the 2 ranks
    packed, the 1 rank padded) train the same steps (uniform: with no weak model loaded); and the
    fake side is what was trained on (the loss differs from the real weak model's)."""
    from wmss_ray.config.loading import config_from_dict

    def run(workers: int, accum: int, source: str, name: str, packed: bool = False):
        base = tiny_cfg(micro_batch_size=2, grad_accum=accum, max_steps=2, wmss_epochs=1.0, num_workers=workers,
                        packing=packed)
        cfg = config_from_dict(base.to_dict(), ["mix.mode=frozen", f"mix.weak_source={source}",
                                                "mix.shuffle_bucket_rows=4"])
        res = train_on_forked_ranks(cfg, "wmss", art["strong"], art["weak"], art["tokenized"], art["sampled"],
                                    str(tmp_path / name), mode="frozen")
        return [m["loss"] for m in read_metrics(res.metrics_path)]

    two, one = run(2, 1, source, "two", packing), run(1, 2, source, "one")
    assert len(two) == 2 and np.allclose(two, one, rtol=1e-5, atol=1e-6), (two, one)
    assert not np.allclose(two, run(1, 2, "model", "model"), rtol=1e-3)


# ------------------------------------------------------------------- the validation-selected peak, the counters
#
# SFT on 2 forked DeepSpeed ranks, validating after every step (``ValidationPoints(every=1,
# keep_peak=True)``), with ``validate_on_ranks`` replaced by a script of accuracies by step (the
# real one is test_validation.py's): rank 0 records a hash of the weights of every model it was
# handed, so a test can tell which step's export became ``peak_model``.

PEAK_STEPS = STEPS  # 6: validation points 1..5, the final model at 6


def _weights_sha(model_dir: str) -> str:
    import hashlib

    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, model_dir
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _scripted_validation(accuracy: dict[int, float], log: Path):
    """A stand-in for ``rank_loop.validate_on_ranks``: step -> accuracy; rank 0 logs what it saw."""
    def validate_on_ranks(cfg, points, model_dir, step, rank, world, device):
        if rank == 0:
            (log / f"step{step}.json").write_text(json.dumps({"model_dir": model_dir, "sha": _weights_sha(model_dir)}))
        acc = accuracy[step]
        return {"validation_accuracy": acc, "validation_loss": 1.0 - acc, "n_validation": 10, "step": step}

    return validate_on_ranks


def _peak_run(art, root: Path, accuracy: dict[int, float], monkey, resume: bool = False, **kw):
    """SFT on 2 forked ranks at ZeRO 0, validating every step with ``accuracy``; (result, out, log)."""
    from wmss_ray.training import rank_loop
    from wmss_ray.training.validation import ValidationPoints

    out, log = root / "out", root / "seen"
    log.mkdir(parents=True, exist_ok=True)
    monkey.setattr(rank_loop, "validate_on_ranks", _scripted_validation(accuracy, log))  # the forks inherit it
    points = ValidationPoints(every=1, rows_path=str(root / "rows.jsonl"), out_root=str(root), keep_peak=True)
    res = train_on_forked_ranks(two_worker_cfg(0), "sft", art["strong"], None, art["tokenized"], None, str(out),
                                resume=resume, validation=points, **kw)
    return res, out, log


def _seen(log: Path, step: int) -> dict:
    return json.loads((log / f"step{step}.json").read_text())


@pytest.fixture(scope="module")
def peak_at_2(art, tmp_path_factory):
    """Accuracies 0.2, 0.5, 0.5 (a tie: the earlier step keeps it), 0.3, 0.1, final 0.4: the peak is step 2."""
    with pytest.MonkeyPatch.context() as monkey:
        return _peak_run(art, tmp_path_factory.mktemp("peak_at_2"), {1: .2, 2: .5, 3: .5, 4: .3, 5: .1, 6: .4}, monkey)


def test_the_peak_is_the_best_validation_point_and_ties_go_to_the_earlier_step(peak_at_2):
    from wmss_ray.training.validation import PEAK_RULE

    res, out, log = peak_at_2
    peak = json.loads((out / "peak.json").read_text())
    assert peak == {"step": 2, "validation_accuracy": .5, "validation_loss": .5, "n_validation": 10,
                    "model_dir": str(out / "peak_model"), "rule": PEAK_RULE}
    assert res.peak == peak and res.model_dir == str(out / "model")
    # peak_model is step 2's interim export, not a later one's (every step trains the weights on)
    assert _seen(log, 2)["model_dir"] == str(out / "interim_model")
    assert _weights_sha(str(out / "peak_model")) == _seen(log, 2)["sha"] != _seen(log, 3)["sha"]
    # the final model was validated as step 6, from <out>/model, and lost
    assert _seen(log, PEAK_STEPS) == {"model_dir": str(out / "model"), "sha": _weights_sha(str(out / "model"))}
    # the validation points are still checkpoints
    assert sorted(p.name for p in (out / "ray_train").iterdir()) == [f"checkpoint_{s:06d}" for s in range(1, 7)]


def test_when_the_final_model_wins_the_peak_names_it_and_no_copy_remains(art, tmp_path, monkeypatch):
    res, out, log = _peak_run(art, tmp_path, {1: .2, 2: .5, 3: .5, 4: .3, 5: .1, 6: .6}, monkeypatch)
    assert res.peak["step"] == PEAK_STEPS and res.peak["model_dir"] == str(out / "model") == res.model_dir
    assert res.peak["validation_accuracy"] == .6
    assert json.loads((out / "peak.json").read_text()) == res.peak
    assert not (out / "peak_model").exists()  # step 2's copy was made, then removed
    assert not any(p.name.startswith("peak_model") for p in out.iterdir())


def test_a_resumed_run_keeps_the_peak_and_its_token_counts(art, peak_at_2, tmp_path, monkeypatch):
    """Stopped after step 3 with the peak at step 2; step 3's checkpoint deleted, so the resumed
    run trains and validates step 3 again: it ties with the peak and, being later, loses (a run
    that forgot the peak at the restart, or let a tie win, would pick step 3). The cumulative
    token counts continue from the checkpoint: the last line equals the uninterrupted run's."""
    import shutil

    accuracy = {1: .2, 2: .5, 3: .5, 4: .5, 5: .5, 6: .5}
    res, out, log = _peak_run(art, tmp_path, accuracy, monkeypatch, stop_after=3)
    assert res.model_dir is None and res.peak["step"] == 2
    step2 = _seen(log, 2)["sha"]
    shutil.rmtree(out / "ray_train" / "checkpoint_000003")
    res, out, log = _peak_run(art, tmp_path, accuracy, monkeypatch, resume=True)
    events = [json.loads(x) for x in (out / "workers.jsonl").read_text().splitlines()]
    assert [e["start_step"] for e in events if e["event"] == "start"] == [0, 0, 2, 2]  # resumed at step 2
    assert res.peak["step"] == 2 and res.peak["model_dir"] == str(out / "peak_model")
    assert _weights_sha(str(out / "peak_model")) == step2
    uninterrupted = read_metrics(peak_at_2[0].metrics_path)
    resumed = read_metrics(res.metrics_path)
    keys = ("step", "input_tokens", "n_tokens", "tokens_seen", "supervised_tokens_seen")
    assert [{k: m[k] for k in keys} for m in resumed] == [{k: m[k] for k in keys} for m in uninterrupted]


def test_the_metrics_lines_count_tokens_and_phase_costs_reads_them(peak_at_2):
    """``log_every`` 1: each line's cumulative counts are the sums of the per-step counts up to it;
    ``phase_costs`` of the finished phase reads them, the updates, the manifest's seconds and the
    ranks' peak memory (no GPU here: ``peak_gpu_mb`` None)."""
    from wmss_ray.io.manifest import Manifest
    from wmss_ray.training.costs import phase_costs

    res, out, _ = peak_at_2
    lines = read_metrics(res.metrics_path)
    assert [m["step"] for m in lines] == list(range(1, PEAK_STEPS + 1))
    assert all(m["input_tokens"] > m["n_tokens"] > 0 for m in lines)
    assert [m["tokens_seen"] for m in lines] == list(np.cumsum([m["input_tokens"] for m in lines]))
    assert [m["supervised_tokens_seen"] for m in lines] == list(np.cumsum([m["n_tokens"] for m in lines]))
    ends = [json.loads(x) for x in (out / "workers.jsonl").read_text().splitlines() if '"end"' in x]
    assert len(ends) == 2 and all(e["peak_gpu_mb"] is None and e["peak_rss_mb"] > 0 for e in ends)
    Manifest(phase="sft", status="completed", fingerprint="f", config_hash="h", seconds=12.5).write(out)
    assert phase_costs(str(out)) == {"updates": PEAK_STEPS, "supervised_tokens": lines[-1]["supervised_tokens_seen"],
                                     "tokens": lines[-1]["tokens_seen"], "seconds": 12.5,
                                     "peak_rss_mb": max(e["peak_rss_mb"] for e in ends), "peak_gpu_mb": None}
