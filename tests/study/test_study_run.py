"""``wmss study`` end to end on configs/test-tiny.yaml, on the session's local Ray cluster, as
Ray tasks side by side. The base run is the session's tiny run (``wmss run`` of the same config, a
Ray job: ``tiny_job_run``), its phases linked as a tune trial links them, so seed 0 (the base's
training seed) links its SFT, scoring and curriculum instead of training them again.

Two calls, as a user grows a study: seed 0 with WMSS and every arm (each arm trained what it
should, SFT-matched-FLOPs the steps the FLOPs formula gives; every column but the seeds' spread),
then 2 seeds of WMSS and one arm of each kind (an SFT arm, a fake-weak arm): seed 0 is reused
whole (no training or evaluation phase runs again: each arm's evaluation is its own phase), seed 1
trains its own trunk and those arms, the seeds share only the phases the training seed does not
touch, the table has every column for every arm; a third call reruns nothing."""

from __future__ import annotations

import csv
import json
import math
import os
import re

import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.config.names import FAKE_WEAK_ARMS, STUDY_ARM_LABELS
from wmss_ray.io.manifest import read_manifest
from wmss_ray.study.arms import arm_runs
from wmss_ray.study.table import CSV_COLUMNS, COSTS
from wmss_ray.training.controls import arm_steps

pytestmark = pytest.mark.integration

SEEDS = 2
GROWN_ARMS = ("sft_matched_flops", "wmss_shuffled_weak")  # the grown study's arms besides WMSS
BASE_TRUNK = ("sft", "score_1", "curriculum_1")


@pytest.fixture(scope="module")
def study(ray_cluster, tiny_job_run, tmp_path_factory):
    """``(first, grown, manifests, printed)``: ``(cfg, table, study.csv's lines)`` each (the second
    call writes the study's files again), ``{manifest: mtime}`` of the study's runs between the two,
    and each call's console lines (``{"first": [...], "grown": [...]}``)."""
    import io

    import wmss_ray.io.console as console

    from wmss_ray.study.runner import run_study
    from wmss_ray.sweep.trial import link_shared_phases

    if tiny_job_run.status != "SUCCEEDED":
        pytest.fail(f"the tiny pipeline job {tiny_job_run.job_id} ended {tiny_job_run.status}")
    common = [f"run.storage={tmp_path_factory.mktemp('study')}", "mix.mode=frozen", "study.validate_every=1",
              "study.max_concurrent=2", "study.n_boot=500",
              "evaluation.samples=2", "evaluation.temperature=1.0"]  # sampled pass@k and calibration
    first = load_config("configs/test-tiny.yaml", common + ["study.seeds=1"])
    # the base run: the tiny run's phases up to its curriculum (mix.mode feeds only WMSS), as if
    # `wmss run` of this config had made them here
    link_shared_phases(tiny_job_run.cfg.run_dir(), first.run_dir(), ("data", "phase0", "tokenize") + BASE_TRUNK)
    printed = {"first": io.StringIO(), "grown": io.StringIO()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(console, "_current", [console.Console(printed["first"], tty=False)])  # what get_console gives
        first_table = run_study(first)
        first_lines, made = _csv(first), _mtimes(os.path.join(first.run_dir(), "study"))
        grown = load_config("configs/test-tiny.yaml",
                            common + [f"study.seeds={SEEDS}", f"study.arms=[{','.join(GROWN_ARMS)}]"])
        mp.setattr(console, "_current", [console.Console(printed["grown"], tty=False)])
        grown_table = run_study(grown)
    printed = {call: out.getvalue().splitlines() for call, out in printed.items()}
    return (first, first_table, first_lines), (grown, grown_table, _csv(grown)), made, printed


def _rows(table):
    return {(r["arm"], r["checkpoint"]): r for r in table["rows"]}


def _csv(cfg):
    with open(os.path.join(cfg.run_dir(), "study", "study.csv")) as f:
        return list(csv.DictReader(f))


def _check_row(r, seeds):
    assert r["seeds"] == seeds and len(r["accuracy"]) == seeds
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"])
    for key in ("loss", "avg_at_k", "pass_at_k", "brier", "ece"):
        assert math.isfinite(r[key]), (r["arm"], key)
    for key in COSTS:
        if key != "peak_gpu_mb":  # no GPU here
            assert r[key] is not None and r[key] >= 0, (r["arm"], key)
    assert r["flops"] > 0 and r["tokens"] > r["supervised_tokens"] > 0
    assert len({c["run_dir"] for c in r["cells"]}) == seeds and all(c["config_hash"] for c in r["cells"])
    if r["checkpoint"] == "peak":
        assert all(1 <= s <= 2 for s in r["peak_steps"])  # a validation point, or the final model


def test_every_arm_has_every_column_for_both_checkpoints(study):
    (cfg, table, lines), _, _, printed = study
    rows = _rows(table)
    done = [m.groups() for m in map(re.compile(r"\[wmss\] study: seed 0 (\S+) done \((\d+)/(\d+)\)").match,
                                    printed["first"]) if m]
    n = len(STUDY_ARM_LABELS)  # each arm once, as it landed, counted
    assert sorted(a for a, _, _ in done) == sorted(STUDY_ARM_LABELS) and [d[1:] for d in done] == [
        (str(k), str(n)) for k in range(1, n + 1)], printed["first"]
    assert set(rows) == {(a, c) for a in STUDY_ARM_LABELS for c in ("final", "peak")}
    assert tuple(lines[0]) == CSV_COLUMNS and len(lines) == 2 * len(STUDY_ARM_LABELS)
    one_seed = {"accuracy_std", "diff_seed_ci_low", "diff_seed_ci_high"}  # a spread needs 2 seeds
    for line in lines:
        unset = [c for c in CSV_COLUMNS if line[c] in ("", "nan")]
        if line["arm"] == "wmss":  # its own reference: no difference to itself
            assert {"diff_vs_wmss", "diff_sample_ci_low"} <= set(unset)
        unset = [c for c in unset if not c.startswith("diff_") and c not in one_seed and c != "peak_gpu_mb"]
        assert not unset, f"{line['arm']} {line['checkpoint']}: unset {unset}"
    for r in rows.values():
        _check_row(r, 1)


def test_each_arm_trained_its_steps_and_the_flops_arm_the_formula_s(study):
    (cfg, table, _), _, _, _ = study
    rows = _rows(table)
    wmss_steps = rows[("wmss", "final")]["updates"]
    assert wmss_steps == cfg.training.max_steps
    assert rows[("sft_matched_flops", "final")]["updates"] == arm_steps("sft_matched_flops", wmss_steps, "frozen") == 3
    for arm in STUDY_ARM_LABELS:
        if arm != "sft_matched_flops":
            assert rows[(arm, "final")]["updates"] == wmss_steps, arm
    # FLOPs per token: a frozen WMSS step 4/3 of an SFT step, a uniform fake weak side 1 (no weak forward)
    per_token = {arm: rows[(arm, "final")]["flops"] / rows[(arm, "final")]["tokens"] for arm in STUDY_ARM_LABELS}
    assert per_token["wmss"] / per_token["sft_matched_updates"] == pytest.approx(4 / 3, rel=0.02)
    assert per_token["wmss_uniform_weak"] / per_token["sft_matched_updates"] == pytest.approx(1.0, rel=0.02)


def test_a_grown_study_reuses_seed_0_and_has_every_column_for_every_arm_over_two_seeds(study):
    (_, first, _), (cfg, table, lines), made, printed = study
    # nothing of seed 0 ran again: its trunk, its arms' runs, its arms' evaluations (those the grown
    # study lists, and the others, untouched)
    root = os.path.join(cfg.run_dir(), "study")
    seed0 = {p for p in made if p.startswith(os.path.join(root, "seed0"))}
    for phase in ("seed0/wmss_1", "seed0/sft_matched_flops", "seed0-wmss_shuffled_weak/wmss_1", "seed0/eval_wmss",
                  "seed0/eval_sft_matched_flops", "seed0/eval_wmss_shuffled_weak", "seed0/eval_sft_higher_lr"):
        assert os.path.join(root, phase, "manifest.json") in seed0, phase
    assert {p: os.path.getmtime(p) for p in seed0} == {p: made[p] for p in seed0}
    # seed 1 trained and evaluated only the arms the grown study lists
    assert {r.arm for r in arm_runs(cfg, 1)} == {"wmss", *GROWN_ARMS}
    assert not os.path.exists(os.path.join(root, "seed1", "sft_higher_lr"))
    assert not os.path.exists(os.path.join(root, "seed1-wmss_uniform_weak"))
    rows, before = _rows(table), _rows(first)
    assert set(rows) == {(a, c) for a in ("wmss", *GROWN_ARMS) for c in ("final", "peak")}
    # the console said each arm of each seed as it landed, with the accuracy its row has
    done = [line for line in printed["grown"] if re.match(r"\[wmss\] study: seed \d+ \S+ done \(", line)]
    assert len(done) == SEEDS * (1 + len(GROWN_ARMS)), printed["grown"]
    for (arm, _), r in ((k, r) for k, r in rows.items() if k[1] == "final"):
        said = [line for line in done if line.startswith(f"[wmss] study: seed 1 {arm} done (")]
        assert len(said) == 1 and f"{r['label']} {r['accuracy'][1]:.3f}" in said[0], (arm, said)
    for key, r in rows.items():
        _check_row(r, SEEDS)
        assert r["accuracy"][0] == before[key]["accuracy"][0]  # seed 0's result, as the first call made it
    assert len(lines) == 2 * (1 + len(GROWN_ARMS))
    for line in lines:
        unset = [c for c in CSV_COLUMNS if line[c] in ("", "nan")]
        if line["arm"] == "wmss":
            assert set(unset) >= {"diff_vs_wmss", "diff_seed_ci_low"}
        unset = [c for c in unset if not (line["arm"] == "wmss" and c.startswith("diff_")) and c != "peak_gpu_mb"]
        assert not unset, f"{line['arm']} {line['checkpoint']}: unset {unset}"
    page = open(os.path.join(cfg.run_dir(), "study", "index.html")).read()
    assert page.count("data:image/png;base64") == 2 and "WMSS-shuffled-weak" in page


def test_the_seeds_share_only_what_the_training_seed_does_not_touch(study):
    _, (cfg, _, _), _, _ = study
    root = os.path.join(cfg.run_dir(), "study")
    for phase in ("data", "phase0", "tokenize"):
        for i in range(SEEDS):
            assert os.path.realpath(os.path.join(root, f"seed{i}", phase)) == os.path.realpath(
                os.path.join(cfg.run_dir(), phase))
    for phase in ("sft", "curriculum_1", "wmss_1", "sft_matched_flops"):
        prints = {read_manifest(os.path.join(root, f"seed{i}", phase)).fingerprint for i in range(SEEDS)}
        assert len(prints) == SEEDS, phase
    # seed 0 trains with the base's seed: the base run's SFT, scores and draw, not trained again;
    # its WMSS trains in its own run (it validates itself for its peak); seed 1 has its own trunk
    for phase in BASE_TRUNK:
        assert os.path.realpath(os.path.join(root, "seed0", phase)) == os.path.realpath(os.path.join(cfg.run_dir(), phase))
        assert not os.path.islink(os.path.join(root, "seed1", phase))
    assert not os.path.islink(os.path.join(root, "seed0", "wmss_1"))
    # a fake-weak arm trains on its seed's M1 and draw (links), with its own WMSS phase
    fake = os.path.join(root, "seed1-wmss_shuffled_weak")
    assert os.path.realpath(os.path.join(fake, "curriculum_1")) == os.path.join(root, "seed1", "curriculum_1")
    assert not os.path.islink(os.path.join(fake, "wmss_1"))
    peak = json.load(open(os.path.join(fake, "wmss_1", "peak.json")))
    assert peak["step"] in (1, 2) and 0.0 <= peak["validation_accuracy"] <= 1.0


def test_the_fake_weak_arms_train_beside_wmss_and_the_sft_arms_after_it(study):
    """The runner's graph (study/runner.unlocked_arms): after a seed's trunk, its WMSS and its
    fake-weak arms start (2 runs at a time here: WMSS and the first fake-weak arm together); its
    SFT arms only once its WMSS is done."""
    (first, _, _), (grown, _, _), _, _ = study
    for index, cfg in ((0, first), (1, grown)):  # seed 0's arms ran in the first call (every arm)
        runs = {r.arm: read_manifest(r.phase_dir) for r in arm_runs(cfg, index)}
        wmss_done = runs["wmss"].finished_at
        for arm, man in runs.items():
            if arm != "wmss" and arm not in FAKE_WEAK_ARMS:
                assert man.started_at >= wmss_done, (index, arm)
        if index == 0:  # the only seed of the first call: nothing else holds a slot
            assert min(runs[a].started_at for a in FAKE_WEAK_ARMS) < wmss_done


def test_a_second_call_reruns_nothing_and_gives_the_same_table(study):
    from wmss_ray.study.runner import run_study

    _, (cfg, table, _), _, _ = study
    before = {p: os.path.getmtime(p) for p in _manifests(cfg.run_dir())}
    again = run_study(cfg)
    assert {p: os.path.getmtime(p) for p in _manifests(cfg.run_dir())} == before
    strip = lambda t: [{k: v for k, v in r.items() if k not in ("cells",)} for r in t["rows"]]  # noqa: E731
    assert json.dumps(strip(again), sort_keys=True, default=str) == json.dumps(strip(table), sort_keys=True, default=str)


def _manifests(run_dir: str) -> list[str]:
    out = []
    for d, _, files in os.walk(run_dir, followlinks=False):
        out += [os.path.join(d, f) for f in files if f == "manifest.json"]
    return sorted(out)


def _mtimes(run_dir: str) -> dict[str, float]:
    return {p: os.path.getmtime(p) for p in _manifests(run_dir)}
