"""One tune trial: its config and run directory, the shared-phase links, and its WMSS phase in
chunks of ``tune.eval_every`` steps with a validation report after each (what ASHA acts on).

A chunk is ``train_phase(..., stop_after=N, export_at_stop=True)``: Ray Train checkpoints at
step N and exports ``wmss_1/interim_model``; the next chunk (same ``out_dir``) resumes from that
checkpoint exactly. The last stretch runs inside the pipeline's own ``wmss_1`` phase (which
resumes the same way), so the trial's manifests are those of a plain run. Intermediate reports
use a seeded subsample of ``tune.eval_samples`` validation rows; the final one the whole split.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

from wmss_ray.config import WMSSConfig
from wmss_ray.config_loading import config_from_dict

SHARED_PHASES = ("data", "phase0", "tokenize", "sft", "score_1")
NO_VALIDATION = ("a tune sweep selects a trial, so it needs a validation split apart from data.eval (the "
                 "test set): set data.validation_fraction (carved from data.train) or data.validation")

Report = Callable[[dict[str, Any]], None]


def trial_config(base: WMSSConfig, params: dict[str, Any], trial_name: str) -> WMSSConfig:
    """The base config with the trial's values and its own run directory under the base run."""
    overrides = [f"{k}={v}" for k, v in params.items()]
    overrides += [f"run.storage={Path(base.run_dir()).resolve() / 'tune'}", f"run.name={trial_name}",
                  "run.iterations=1", "evaluation.baseline=false"]
    return config_from_dict(base.to_dict(), overrides, source=f"tune trial {trial_name}")


def link_shared_phases(base_run_dir: Path, trial_run_dir: Path, phases: tuple[str, ...] = SHARED_PHASES) -> None:
    """Symlink ``phases`` of the base run into the trial's run dir (the pipeline never reruns a link)."""
    trial_run_dir.mkdir(parents=True, exist_ok=True)
    for phase in phases:
        src, dst = base_run_dir / phase, trial_run_dir / phase
        if src.exists() and not dst.exists():
            os.symlink(src, dst, target_is_directory=True)


def subsample(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows drawn with ``seed`` (the same rows for every trial), kept in file order."""
    if n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _evaluate(model_dir: str, rows: list[dict[str, Any]], cfg: WMSSConfig, out_dir: Path) -> dict[str, Any]:
    from wmss_ray.evaluation import evaluate_models

    res = evaluate_models({"WMSS": model_dir}, rows, cfg, str(out_dir), eval_set="validation")["WMSS"]
    return {"validation_accuracy": float(res.accuracy), "validation_loss": float(res.loss), "n_validation": int(res.n)}


def _wmss_chunks(cfg: WMSSConfig, outputs: dict[str, Any], rows: list[dict[str, Any]], trial_dir: Path,
                 report: Report) -> None:
    """Train ``wmss_1`` up to the last multiple of ``eval_every`` below its end, reporting after each
    chunk; the pipeline's ``wmss_1`` then trains the rest (resuming from the last checkpoint)."""
    from wmss_ray.pipeline import RunContext
    from wmss_ray.training.trainer import INTERIM_MODEL, build_spec, train_phase

    ctx = RunContext(cfg)
    ctx.outputs = outputs
    args = dict(strong_init=ctx.model(1), weak_init=ctx.weak_model(1), tokenized_path=ctx.out("tokenize", "tokenized"),
                sampled_ids_path=ctx.out("curriculum_1", "sampled_ids"), out_dir=str(trial_dir / "wmss_1"))
    epochs = cfg.training.wmss_epochs
    total = build_spec(cfg, "wmss", **args, epochs=epochs).plan.total_steps
    every = cfg.tune.eval_every
    for stop in range(every, total, every):
        train_phase(cfg, "wmss", **args, epochs=epochs, stop_after=stop, export_at_stop=True)
        metrics = _evaluate(str(trial_dir / "wmss_1" / INTERIM_MODEL), rows, cfg, trial_dir / f"validation_step{stop}")
        report({**metrics, "step": stop, "final": False})
    shutil.rmtree(trial_dir / "wmss_1" / INTERIM_MODEL, ignore_errors=True)  # a full model copy per trial


def run_trial(base: WMSSConfig, params: dict[str, Any], trial_name: str,
              report: Report | None = None) -> dict[str, Any]:
    """One trial: curriculum -> WMSS (in reported chunks when ``report`` and ``tune.eval_every``
    are given) -> the WMSS model on the whole validation split. Returns the final metrics (also
    passed to ``report``). Tests call it without Ray Tune."""
    from wmss_ray.data.ray_corpus import validation_eval_input
    from wmss_ray.evaluation import load_eval_rows
    from wmss_ray.pipeline import run_pipeline

    cfg = trial_config(base, params, trial_name)
    trial_dir = Path(cfg.run_dir()).resolve()
    link_shared_phases(Path(base.run_dir()).resolve(), trial_dir)
    outputs = run_pipeline(cfg, until="curriculum_1")
    validation = validation_eval_input(cfg, outputs)
    if validation is None:
        raise ValueError(NO_VALIDATION)
    rows = load_eval_rows(validation, cfg)
    if report is not None and cfg.tune.eval_every:
        from wmss_ray.manifest import read_manifest

        old = read_manifest(str(trial_dir / "wmss_1"))
        if not (old and old.status == "completed"):  # a restarted trial whose WMSS is done: no chunks
            _wmss_chunks(cfg, outputs, subsample(rows, cfg.tune.eval_samples, cfg.run.seed), trial_dir, report)
    outputs = run_pipeline(cfg, until="wmss_1")
    steps = int(outputs["wmss_1"].get("steps") or 0)
    metrics = {**_evaluate(outputs["wmss_1"]["model_dir"], rows, cfg, trial_dir / "validation"),
               "step": steps, "final": True}
    if report is not None:
        report(metrics)
    return metrics
