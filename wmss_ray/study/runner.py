"""Run a study: the shared phases once, then each seed as a Ray task running its runs through the
pipeline's one runner, then the table and the page.

Seeds and arms are independent runs, so they run side by side (``study.max_concurrent`` runs,
else as many as the cluster holds one run's Train workers); each is a Ray task of 0 CPUs (its
phases ask Ray for their own workers and actors, as a tune trial's driver does) retried on a lost
node: every run is resumable (phase manifests, checkpoints), so a retried or rerun task continues
where it stopped, on a shared filesystem or on object storage alike. ``wmss study CONFIG`` again continues the
study: completed phases are skipped, and the table is made again from what the runs wrote.

The work is a small graph of Ray tasks, scheduled by the driver, each started as soon as what it
starts from is done (:func:`unlocked_arms`): per seed its trunk (:func:`run_trunk`: seed ``i``'s
run ``study/seed<i>`` through its first curriculum: SFT, scoring, curriculum); then its WMSS arm
and its fake-weak arms at once (:func:`run_arm`: WMSS through ``wmss_K`` in the seed's run, a
fake-weak arm's ``wmss_1`` as its own run ``study/seed<i>-<arm>`` linking the trunk); after WMSS,
its SFT arms (each its own phase of the seed's run: their step counts follow from WMSS's steps).
Each arm's task ends with the arm's evaluation (:func:`arm_eval_phase`: its phase ``eval_<arm>`` in
the seed's run, the final model and the peak when it is not the final model, on the test set with
the same evaluator, samples and checker); once every arm of a seed is done, :func:`finish_seed`
writes the seed's record. Every training phase validates itself every ``study.validate_every``
steps and keeps its peak. At 64 GPUs and 8-GPU
runs, 8 runs at a time: 3 seeds x 8 arms are 3 trunks, then 24 arm runs in three waves (the 3
WMSS runs and 5 of the 9 fake-weak runs first), where waiting for each seed's WMSS before any of
its arms took four: one WMSS training time less of wall time. Evaluating per arm, as soon as
the arm is trained, spreads the 3 x 8 x 2 test-set passes over the slots: the last wave ends with
one arm's evaluation, where one task per seed evaluated its 9-16 models in a row after its last
arm. And an evaluation's fingerprint is its arm's: a study grown to more seeds or other arms
evaluates only the arms it trains.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from wmss_ray.config.loading import config_from_dict
from wmss_ray.config.names import FAKE_WEAK_ARMS
from wmss_ray.config.schema import ConfigError, WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.console import get_console
from wmss_ray.io.manifest import read_manifest, unlink_phase
from wmss_ray.study.arms import (FAKE_SHARED, SEED_SHARED, VALIDATION_ROWS, ArmRun, arm_runs, check_cadence,
                                 check_study, fake_config, record_cadence, seed_config, study_root)

if TYPE_CHECKING:
    from wmss_ray.phases import Phase

EVAL_PREFIX = "eval_"  # <seed run>/eval_<arm>/: the arm's final model and its peak, on the test set
SEED_RECORD = "study_seed.json"  # <seed run>/: what the table reads (runner.seed_record)


def max_concurrent(cfg: WMSSConfig, cluster: dict[str, float]) -> int:
    """Runs at once: ``study.max_concurrent``, else as many as ``cluster`` (``ray.cluster_resources()``)
    holds one run's Train workers (its largest phase), at least 1."""
    if cfg.study.max_concurrent:
        return cfg.study.max_concurrent
    sc = cfg.scaling
    fits = [cluster.get("CPU", 1.0) / max(sc.num_workers * sc.cpus_per_worker, 1e-9)]
    if sc.gpus_per_worker:
        fits.append(cluster.get("GPU", 0.0) / (sc.num_workers * sc.gpus_per_worker))
    return max(1, math.floor(min(fits)))


def _validation_rows(cfg: WMSSConfig, outputs: dict[str, Any], run_dir: str) -> str:
    """The validation split's normalised rows at ``<run_dir>/validation_rows.jsonl`` (what the
    ranks validate on); refuses a config without a validation split."""
    from wmss_ray.stages.evaluate import load_eval_rows
    from wmss_ray.stages.tokenize import validation_eval_input
    from wmss_ray.training.validation import write_rows

    source = validation_eval_input(cfg, outputs)
    if source is None:  # check_study refuses such a config before anything runs
        raise ConfigError(f"{storage.redact(run_dir)}: no validation split")
    path = storage.join(run_dir, VALIDATION_ROWS)
    write_rows(load_eval_rows(source, cfg), path)
    return path


def _train_options(cfg: WMSSConfig, runs: list[ArmRun], rows_path: str) -> dict[str, dict[str, Any]]:
    """``train_options`` for the pipeline: each arm's phase validates itself and keeps its peak."""
    from wmss_ray.training.validation import ValidationPoints

    return {r.phase: {"validation": ValidationPoints(every=cfg.study.validate_every, rows_path=rows_path,
                                                     out_root=r.phase_dir, keep_peak=True)} for r in runs}


def _seed(base_dict: dict[str, Any], index: int) -> tuple[WMSSConfig, WMSSConfig, str]:
    base = config_from_dict(base_dict, source="study")
    cfg = seed_config(base, index)
    return base, cfg, storage.location(cfg.run_dir())


def trunk_links(base: WMSSConfig, cfg: WMSSConfig, wmss_phase: str) -> tuple[str, ...]:
    """The trunk phases of seed config ``cfg`` after the shared ones and before its WMSS arm's
    ``wmss_phase`` that the base run completed with the same fingerprints: SFT, scores and
    curriculum of a seed that trains with the base's own seed (seed 0), when ``wmss run`` made
    them first. The seed links them instead of training them again; the WMSS arm itself always
    trains in the seed's run (it validates itself and keeps its peak)."""
    from wmss_ray.pipeline import completed_elsewhere

    return tuple(completed_elsewhere(cfg, storage.location(base.run_dir()), _trunk(cfg, wmss_phase)))


def _trunk(cfg: WMSSConfig, wmss_phase: str) -> tuple[str, ...]:
    """The phases of a seed's run after the shared ones and before ``wmss_phase``."""
    from wmss_ray.phases import build_phases

    names = [p.name for p in build_phases(cfg)]
    return tuple(names[names.index(SEED_SHARED[-1]) + 1:names.index(wmss_phase)])


def run_trunk(base_dict: dict[str, Any], index: int) -> str:
    """Seed ``index``'s trunk: its run through its first curriculum (SFT, scoring, curriculum:
    :data:`FAKE_SHARED`, what every arm of the seed starts from), the shared phases linked from the
    base run, and those of the base run's trunk that have this seed's fingerprints
    (:func:`trunk_links`); and the validation rows every arm validates on. Returns the seed's run dir."""
    from wmss_ray.pipeline import run_pipeline
    from wmss_ray.sweep.trial import link_shared_phases

    base, cfg, seed_dir = _seed(base_dict, index)
    wmss = arm_runs(base, index)[0]
    same = trunk_links(base, cfg, wmss.phase)
    for phase in _trunk(cfg, wmss.phase):
        if phase not in same:  # a link made by an earlier study, to a base phase that no longer matches
            unlink_phase(storage.join(seed_dir, phase))
    link_shared_phases(base.run_dir(), seed_dir, SEED_SHARED + same)
    _validation_rows(cfg, run_pipeline(cfg, until="tokenize"), seed_dir)
    run_pipeline(cfg, until=FAKE_SHARED[-1])
    return seed_dir


def unlocked_arms(done: str, arms: list[str]) -> list[str]:
    """The arms of a seed (``arms``, WMSS first: :func:`~wmss_ray.study.arms.arm_runs`' order) that
    can start once ``done`` completed: after its ``"trunk"`` WMSS and the fake-weak arms (they start
    from the curriculum); after ``"wmss"`` the SFT arms (their step counts follow from WMSS's steps,
    ``training/controls.arm_steps``, and each runs as a phase after WMSS in the seed's run)."""
    if done == "trunk":
        return [a for a in arms if a == "wmss" or a in FAKE_WEAK_ARMS]
    if done == "wmss":
        return [a for a in arms if a != "wmss" and a not in FAKE_WEAK_ARMS]
    return []


def run_arm(base_dict: dict[str, Any], index: int, arm: str) -> dict[str, Any]:
    """One arm of seed ``index`` once what it starts from is done (:func:`unlocked_arms`): WMSS as
    the seed's run through ``wmss_K`` (only ``wmss_K`` validates itself), an SFT arm as its own
    phase of the seed's run (``run_pipeline(only=...)``: the other arms of the run are not touched),
    a fake-weak arm as its own run linking the seed's phases up to the curriculum; then its
    evaluation (:func:`evaluate_arm`). Returns ``{"phase_dir", "models"}``: the arm's phase dir and
    its evaluation's ``{label: {"accuracy", "n"}}``."""
    from wmss_ray.pipeline import run_pipeline
    from wmss_ray.sweep.trial import link_shared_phases

    base, cfg, seed_dir = _seed(base_dict, index)
    r = next(r for r in arm_runs(base, index) if r.arm == arm)
    rows_path = storage.join(seed_dir, VALIDATION_ROWS)
    record_cadence(base, r)
    if arm == "wmss":
        outputs = run_pipeline(cfg, until=r.phase, train_options=_train_options(cfg, [r], rows_path))
    elif arm in FAKE_WEAK_ARMS:
        fcfg = fake_config(cfg, index, arm)
        link_shared_phases(seed_dir, r.run_dir, FAKE_SHARED)
        outputs = run_pipeline(fcfg, until="wmss_1", train_options=_train_options(fcfg, [r], rows_path))
    else:
        outputs = run_pipeline(cfg, only=(r.phase,), train_options=_train_options(cfg, [r], rows_path))
    record_cadence(base, r)
    evaluated = evaluate_arm(cfg, outputs, r)
    return {"phase_dir": r.phase_dir, "models": evaluated.get("models", {})}


def arm_done_line(index: int, arm: str, models: dict[str, dict[str, Any]], done: int, total: int) -> str:
    """The console's line when arm ``arm`` of seed ``index`` is trained and evaluated (``models``:
    :func:`run_arm`'s), the ``done``-th of the seed's ``total`` arms: its test-set accuracies as they
    land, days before the table of a large study."""
    scores = ", ".join(f"{name} {m['accuracy']:.3f}" for name, m in models.items())
    n = next((int(m["n"]) for m in models.values()), 0)
    return f"[wmss] study: seed {index} {arm} done ({done}/{total}): {scores} on {n} test problems"


def finish_seed(base_dict: dict[str, Any], index: int) -> dict[str, Any]:
    """After every arm of seed ``index`` trained and evaluated: ``<seed run>/study_seed.json``
    (returned): per arm its run, phase, final and peak results and costs."""
    base, cfg, seed_dir = _seed(base_dict, index)
    record = seed_record(cfg, index, arm_runs(base, index))
    storage.write_text(storage.join(seed_dir, SEED_RECORD), json.dumps(record, indent=2, allow_nan=True))
    return record


def _final_and_peak(r: ArmRun) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The manifest outputs of arm ``r``'s phase (``model_dir``, ``steps``) and its peak (``peak.json``)."""
    man = read_manifest(r.phase_dir)
    if man is None or man.status != "completed":
        raise RuntimeError(f"study: {storage.redact(r.phase_dir)} did not complete")
    return man.outputs, man.outputs.get("peak")


def _peak_label(label: str) -> str:
    return f"{label} (peak)"


def eval_phase(arm: str) -> str:
    """The seed run's phase that evaluates arm ``arm``."""
    return EVAL_PREFIX + arm


def arm_eval_phase(r: ArmRun) -> Phase:
    """The :class:`~wmss_ray.phases.Phase` ``eval_<arm>`` that evaluates arm ``r`` (its training
    phase completed): on the test set, its final model under its label and its peak, when that is
    not the final model, under ``"<label> (peak)"``. Its fingerprint is the models' directories and
    the fingerprint of the phase that trained them (which fixes the peak too), so an arm trained
    again is evaluated again, and no other arm's evaluation depends on it."""
    from wmss_ray.phases import Phase, RunContext, eval_corpus
    from wmss_ray.stages.evaluate import evaluate_models

    final, peak = _final_and_peak(r)
    models = {r.label: final["model_dir"]}
    if peak is not None and int(peak["step"]) != int(final["steps"]):
        models[_peak_label(r.label)] = peak["model_dir"]
    name = eval_phase(r.arm)
    extra = {"models": dict(sorted(models.items())), "fingerprint": _fingerprint(r.phase_dir)}

    def run(ctx: RunContext) -> dict[str, Any]:
        res = evaluate_models(models, eval_corpus(ctx), ctx.cfg, ctx.phase_dir(name), eval_set="test")
        return {"outputs": {"results": storage.join(ctx.phase_dir(name), "eval_results.json"),
                            "models": {n: {"accuracy": x.accuracy, "n": x.n} for n, x in res.items()}}}

    # not hashed: how many rows per forward, and whether the seed's run has an SFT-continued phase
    # (seed_config sets it from study.arms: the set of arms must not change an arm's evaluation)
    return Phase(name, [], ["evaluation", "data.eval", "data.reference_column", "data.supervise"], run,
                 ("evaluation.logits_mb", "evaluation.sft_continued"), extra=extra)


def evaluate_arm(cfg: WMSSConfig, outputs: dict[str, Any], r: ArmRun) -> dict[str, Any]:
    """Run arm ``r``'s :func:`arm_eval_phase` in seed config ``cfg``'s run (resumable, skipped when
    completed with its fingerprint). ``outputs``: the pipeline outputs of the arm's run (the demo's
    test set is the ``data`` phase's). Returns its outputs."""
    from wmss_ray.phases import RunContext
    from wmss_ray.pipeline import run_phases

    ctx = RunContext(cfg)
    ctx.outputs = dict(outputs)
    return run_phases(ctx, [arm_eval_phase(r)])[eval_phase(r.arm)]


def _fingerprint(phase_dir: str) -> str | None:
    man = read_manifest(phase_dir)
    return man.fingerprint if man is not None else None


def _eval_entry(results_path: str | None, label: str) -> dict[str, Any] | None:
    if not results_path or not storage.exists(results_path):
        return None
    return json.loads(storage.read_text(results_path))["models"].get(label)


def seed_record(cfg: WMSSConfig, index: int, runs: list[ArmRun]) -> dict[str, Any]:
    """What the study table reads for one seed: per arm its run dir, config hash, phase, final and
    peak test-set results (its ``eval_<arm>/eval_results.json`` entries: accuracy, loss, pass@k,
    calibration, ``per_sample_path``), the peak's step and validation accuracy, and the phase's costs."""
    from wmss_ray.study.costs import arm_costs

    seed_dir = storage.location(cfg.run_dir())
    arms = {}
    for r in runs:
        final, peak = _final_and_peak(r)
        evaluated = read_manifest(storage.join(seed_dir, eval_phase(r.arm)))
        if evaluated is None or evaluated.status != "completed":  # run_arm evaluates every arm it trains
            raise RuntimeError(f"study: {storage.redact(storage.join(seed_dir, eval_phase(r.arm)))} did not complete")
        results = evaluated.outputs.get("results")
        final_eval = _eval_entry(results, r.label)
        if peak is None or int(peak["step"]) == int(final["steps"]):
            peak_eval = final_eval
        else:
            peak_eval = _eval_entry(results, _peak_label(r.label))
        run_cfg = cfg if r.arm not in FAKE_WEAK_ARMS else fake_config(cfg, index, r.arm)
        arms[r.arm] = {"label": r.label, "run_dir": r.run_dir, "phase": r.phase, "config_hash": run_cfg.config_hash(),
                       "steps": int(final["steps"]), "final": final_eval, "peak": peak_eval,
                       "peak_step": int(peak["step"]) if peak else None,
                       "peak_validation_accuracy": peak.get("validation_accuracy") if peak else None,
                       "costs": arm_costs(run_cfg, r)}
    return {"seed": index, "train_seed": cfg.train_seed, "run_dir": storage.location(cfg.run_dir()), "arms": arms}


def run_study(base: WMSSConfig) -> dict[str, Any]:
    """The study of ``base``: the shared phases in the base run; then per seed its trunk, its arms,
    its evaluation, as Ray tasks (at most :func:`max_concurrent` at once, the trunks first); then
    ``<run>/study/study.json``, ``study.csv`` and ``index.html``. Returns the table."""
    import ray

    from wmss_ray.cluster import ensure_ray
    from wmss_ray.pipeline import run_pipeline
    from wmss_ray.study.page import write_study_page
    from wmss_ray.study.table import study_table, write_table

    check_study(base)
    root = study_root(base)
    storage.check_reachable(root)
    check_cadence(base)
    run_pipeline(base, until="tokenize")  # the phases every seed shares
    ensure_ray()
    at_once = max_concurrent(base, ray.cluster_resources())
    console = get_console()
    n, arms = base.study.seeds, [r.arm for r in arm_runs(base, 0)]
    console.line(f"[wmss] study: {n} seed{'s' if n != 1 else ''} x {len(arms)} arm{'s' if len(arms) != 1 else ''} "
                 f"in {storage.redact(root)}, {at_once} run{'s' if at_once != 1 else ''} at a time")
    # 0 CPUs each: their phases reserve their own workers; retried when a node is lost (runs resume)
    trunk, arm_task, finish = (ray.remote(num_cpus=0, max_retries=3)(f) for f in (run_trunk, run_arm, finish_seed))
    base_dict = base.to_dict()
    ready = [(trunk, (i,)) for i in range(n)]
    running: dict[Any, tuple[Any, tuple]] = {}
    arms_left = {i: len(arms) for i in range(n)}
    records: dict[int, dict[str, Any]] = {}
    while ready or running:
        while ready and len(running) < at_once:
            fn, args = ready.pop(0)
            running[fn.remote(base_dict, *args)] = (fn, args)
        done, _ = ray.wait(list(running), num_returns=1)
        fn, args = running.pop(done[0])
        result, i = ray.get(done[0]), args[0]
        if fn is finish:
            records[i] = result
            console.line(f"[wmss] study: seed {i} done ({len(records)}/{n})")
            continue
        if fn is arm_task:
            arms_left[i] -= 1
            console.line(arm_done_line(i, args[1], result["models"], len(arms) - arms_left[i], len(arms)))
            if arms_left[i] == 0:
                ready.insert(0, (finish, (i,)))
        # the arms it unlocks after the arms already waiting, ahead of the trunks still to run
        at = next((k for k, (f, _) in enumerate(ready) if f is trunk), len(ready))
        ready[at:at] = [(arm_task, (i, a)) for a in unlocked_arms("trunk" if fn is trunk else args[1], arms)]
    table = study_table(base, [records[i] for i in sorted(records)])
    write_table(root, table)
    page = write_study_page(root, table)
    console.line(f"[wmss] study: page {storage.redact(page)}")
    return table
