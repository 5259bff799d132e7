"""One tune trial: its config and run directory, the shared-phase links, and its WMSS phase with
a validation report every ``tune.eval_every`` steps (what ASHA acts on).

Every run a trial makes is the pipeline's, through its one runner (``pipeline.run_pipeline`` ->
``run_phases``): a seed's run dir links the base run's phases, runs ``curriculum_1`` and
``wmss_1`` with the same skip / resume / clear rules and leaves the manifests of a plain run.
Every report goes through one function, ``sweep.reports.trial_report`` (the seeds' mean,
``accuracy_std``, ``step``, ``final``), on one of two routes:

- one seed (``tune.seeds: 1``, the default): the pipeline's ``wmss_1`` is one Train run that
  validates itself (``wmss_ray/training/validation.py``: the ranks export
  ``wmss_1/interim_model``, generate for their share of the rows, and the step is checkpointed;
  on object storage each node reads the export through ``training.validation.node_copy``);
  under Tune each report reaches ASHA while the run goes on (``wmss_ray/sweep/reports.py``),
  without Tune (tests) ``report`` gets them, in order, when the run ends.
- ``tune.seeds`` S > 1: the trial runs its configuration S times, ``curriculum.seed = run.seed + i``
  (another curriculum draw and WMSS data order) in ``<run>/tune/<trial>-seed<i>``, and every
  report is the seeds' mean; the seeds train in lockstep chunks: the pipeline's ``wmss_1`` with
  ``stop_after=N, export_at_stop=True`` per seed (a checkpoint at step N,
  ``wmss_1/interim_model``, the phase ``stopped``), the seeds' evaluation, the next chunk resuming
  from the checkpoint (the same fingerprint); the last stretch finishes the phase the same way.

Why multi-seed trials keep lockstep chunks rather than validating in-run like one seed: a report
at step k needs every seed's step k. In-run, that needs the S Train runs at once, i.e. S times
the workers ``driver.trial_resources`` reserves per trial (more than it reserves is the Tune +
Train V2 hang), or one seed after another, so that the first mean exists only once every seed has
trained to its end and ASHA could stop nothing early. Chunks keep one Train run at a time and
the reports where ASHA needs them; they cost a worker-group start per report, and tests prove
that chunked and in-run training give the same losses and validation outcomes.

Intermediate reports use a seeded subsample of ``tune.eval_samples`` validation rows
(``<seed run dir>/validation_step<k>/``), the final one the whole split (``<seed run
dir>/validation/eval_WMSS.jsonl``, kept for the paired comparison with the sweep's control,
``wmss_ray/sweep/control.py``).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from wmss_ray.config.loading import config_from_dict
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.manifest import link_phase, linked_phase

SHARED_PHASES = ("data", "phase0", "tokenize", "sft", "score_1")
NO_VALIDATION = ("a tune sweep selects a trial, so it needs a validation split apart from data.eval (the "
                 "test set): set data.validation_fraction (carved from data.train) or data.validation")

Report = Callable[[dict[str, Any]], None]


def trial_config(base: WMSSConfig, params: dict[str, Any], trial_name: str, seed_index: int = 0) -> WMSSConfig:
    """The base config with the trial's values and its own run directory under the base run.

    ``seed_index`` i > 0 (``tune.seeds``): ``curriculum.seed = run.seed + i`` in
    ``<run>/tune/<trial>-seed<i>``; i = 0 keeps ``curriculum.seed`` as given (null: run.seed), so
    it is the run ``wmss run best.yaml`` makes."""
    overrides = [f"{k}={v}" for k, v in params.items()]
    name = trial_name if seed_index == 0 else f"{trial_name}-seed{seed_index}"
    overrides += [f"run.storage={sweep_root(base)}", f"run.name={name}",
                  "run.iterations=1", "evaluation.sft_continued=false"]
    if seed_index:
        overrides.append(f"curriculum.seed={base.run.seed + seed_index}")
    return config_from_dict(base.to_dict(), overrides, source=f"tune trial {name}")


def sweep_root(base: WMSSConfig) -> str:
    """``<run>/tune``: an absolute local path (symlinks resolved) or a URI (``s3://.../tune``)."""
    return storage.join(storage.location(base.run_dir()), "tune")


def seed_run_dirs(root: str, trial_name: str, seeds: int) -> list[str]:
    """The run directories of a trial's seeds under ``root`` = ``<run>/tune`` (see :func:`trial_config`)."""
    return [storage.join(str(root), trial_name if i == 0 else f"{trial_name}-seed{i}") for i in range(seeds)]


def link_shared_phases(base_run_dir: str, trial_run_dir: str, phases: tuple[str, ...] = SHARED_PHASES) -> None:
    """Link ``phases`` of the base run into the trial's run dir (``manifest.link_phase``: a symlink,
    or on object storage a reference file ``<phase>.link``; the pipeline never reruns a link).
    A phase the base run itself links (a study's seed run) is linked to what it stands for: on
    object storage a link is a reference file, not a directory, and was missed here before, so
    each study arm ran its seed's data and tokenize phases (and the demo's M0) again."""
    base_run_dir, trial_run_dir = storage.location(str(base_run_dir)), storage.location(str(trial_run_dir))
    for phase in phases:
        src, dst = storage.join(base_run_dir, phase), storage.join(trial_run_dir, phase)
        src = linked_phase(src) or src
        if storage.exists(src) and linked_phase(dst) is None and not storage.exists(dst):
            link_phase(src, dst)


def subsample(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows drawn with ``seed`` (the same rows for every trial), kept in file order.

    A draw by position (``random.Random(seed).sample``), not ``data.splits.seeded_subsample``'s
    draw by sample-id hash (``evaluation.max_samples``): the two pick other rows, and each is what
    its results so far were computed on; changing either changes them."""
    if n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


VALIDATION_DIR = "validation"  # <trial run dir>/validation/eval_WMSS.jsonl: the per-problem outcomes


def _evaluate(model_dir: str, rows: list[dict[str, Any]], cfg: WMSSConfig, out_dir: str) -> dict[str, Any]:
    from wmss_ray.stages.evaluate import evaluate_models

    res = evaluate_models({"WMSS": model_dir}, rows, cfg, out_dir, eval_set="validation")["WMSS"]
    return {"validation_accuracy": float(res.accuracy), "validation_loss": float(res.loss), "n_validation": int(res.n)}


class _Seed:
    """One seed of a trial: its config, run dir and the pipeline outputs up to its curriculum."""

    def __init__(self, base: WMSSConfig, params: dict[str, Any], trial_name: str, index: int):
        from wmss_ray.pipeline import run_pipeline

        self.cfg = trial_config(base, params, trial_name, index)
        self.dir = storage.location(self.cfg.run_dir())
        link_shared_phases(base.run_dir(), self.dir)
        self.outputs = run_pipeline(self.cfg, until="curriculum_1")

    def train_args(self) -> dict[str, Any]:
        from wmss_ray.pipeline import RunContext

        ctx = RunContext(self.cfg)
        ctx.outputs = self.outputs
        return dict(strong_init=ctx.model(1), weak_init=ctx.weak_model(1), tokenized_path=ctx.out("tokenize", "tokenized"),
                    sampled_ids_path=ctx.out("curriculum_1", "sampled_ids"), out_dir=storage.join(self.dir, "wmss_1"),
                    epochs=self.cfg.training.wmss_epochs)

    def wmss_done(self) -> bool:
        from wmss_ray.io.manifest import read_manifest

        old = read_manifest(storage.join(self.dir, "wmss_1"))
        return bool(old and old.status == "completed")


def _wmss_chunks(seeds: list[_Seed], rows: list[dict[str, Any]], report: Report) -> None:
    """Train every seed's ``wmss_1`` up to the last multiple of ``eval_every`` below its end, in
    lockstep, reporting the seeds' mean after each chunk; the pipeline's ``wmss_1`` then trains
    the rest (resuming from the last checkpoint)."""
    from wmss_ray.pipeline import run_pipeline
    from wmss_ray.sweep.reports import trial_report
    from wmss_ray.training.rank_loop import INTERIM_MODEL
    from wmss_ray.training.trainer import build_spec

    cfg = seeds[0].cfg  # a swept dedup can draw another number of samples per seed: chunk to the shortest
    total = min(build_spec(s.cfg, "wmss", **s.train_args()).plan.total_steps for s in seeds)
    for stop in range(cfg.tune.eval_every, total, cfg.tune.eval_every):
        per_seed = []
        for seed in seeds:
            chunk = {"stop_after": stop, "export_at_stop": True}  # the phase ends "stopped", resumable
            run_pipeline(seed.cfg, until="wmss_1", train_options={"wmss_1": chunk})
            # the URI itself, not a node_copy: the evaluation may run on Ray actors on other nodes
            # (each loads it through its node's model cache; chunks are a Train run apart, so their
            # exports' modification times differ and the cache never hands back the previous one)
            per_seed.append(_evaluate(storage.join(seed.dir, "wmss_1", INTERIM_MODEL), rows, seed.cfg,
                                      storage.join(seed.dir, f"validation_step{stop}")))
        report(trial_report(per_seed, stop, final=False))
    for seed in seeds:
        storage.delete_dir(storage.join(seed.dir, "wmss_1", INTERIM_MODEL))  # a full model copy per seed


def _wmss_one_run(seed: _Seed, rows: list[dict[str, Any]]) -> None:
    """One seed's ``wmss_1`` as one Train run validating itself every ``eval_every`` steps on
    ``rows``, each validation reported to Tune as it goes (inside a Tune trial only)."""
    from wmss_ray.pipeline import run_pipeline
    from wmss_ray.sweep.reports import ValidationToTune
    from wmss_ray.training.rank_loop import INTERIM_MODEL
    from wmss_ray.training.validation import ValidationPoints, write_rows

    rows_path = storage.join(seed.dir, "validation_rows.jsonl")
    write_rows(rows, rows_path)
    points = ValidationPoints(every=seed.cfg.tune.eval_every, rows_path=rows_path, out_root=seed.dir)
    run_pipeline(seed.cfg, until="wmss_1", train_options={"wmss_1": {"validation": points,
                                                                  "callbacks": [ValidationToTune()]}})
    storage.delete_dir(storage.join(seed.dir, "wmss_1", INTERIM_MODEL))  # a full model copy


def run_trial(base: WMSSConfig, params: dict[str, Any], trial_name: str,
              report: Report | None = None, to_tune: bool = False) -> dict[str, Any]:
    """One trial: for each of ``tune.seeds`` seeds, curriculum -> WMSS (with intermediate reports
    when ``report`` and ``tune.eval_every`` are given) -> the WMSS model on the whole validation
    split (``<seed run dir>/validation/eval_WMSS.jsonl``). Returns the final metrics, the seeds'
    mean (also passed to ``report``). ``to_tune``: inside a Tune trial (``report`` is
    ``tune.report``), a one-seed trial's intermediate reports go to Tune from its Train run;
    otherwise (tests, without Ray Tune) every trial reports from chunks of its phase."""
    from wmss_ray.pipeline import run_pipeline
    from wmss_ray.stages.evaluate import load_eval_rows
    from wmss_ray.stages.tokenize import validation_eval_input
    from wmss_ray.sweep.reports import trial_report

    seeds = [_Seed(base, params, trial_name, i) for i in range(base.tune.seeds)]
    validation = validation_eval_input(seeds[0].cfg, seeds[0].outputs)
    if validation is None:
        raise ValueError(NO_VALIDATION)
    rows = load_eval_rows(validation, seeds[0].cfg)
    if report is not None and base.tune.eval_every:
        todo = [s for s in seeds if not s.wmss_done()]  # a restarted trial whose WMSS is done: no reports
        few = subsample(rows, base.tune.eval_samples, base.run.seed)
        if len(seeds) == 1 and todo and to_tune:
            _wmss_one_run(todo[0], few)
        elif todo:
            _wmss_chunks(todo, few, report)
    per_seed, steps = [], set()
    for seed in seeds:
        outputs = run_pipeline(seed.cfg, until="wmss_1")
        steps.add(int(outputs["wmss_1"].get("steps") or 0))
        per_seed.append(_evaluate(outputs["wmss_1"]["model_dir"], rows, seed.cfg, storage.join(seed.dir, VALIDATION_DIR)))
    # "step" is what ASHA and the equal-compute control compare; seeds differ only under a swept dedup
    metrics = trial_report(per_seed, max(steps), final=True, equal_steps=len(steps) == 1)
    if report is not None:
        report(metrics)
    return metrics
