"""Ray Tune sweeps over the WMSS knobs (λ, α, β, γ, mode, ...).

Everything before the curriculum (data, pre-training, tokenisation, SFT, scoring) does not depend
on the swept keys (``mix.*`` and ``curriculum.*``, enforced by the config schema), so it runs once
in the base run directory. Each trial gets its own run directory ``<run_dir>/tune/<trial>/`` whose
upstream phase directories are symbolic links to the base run's: the pipeline's fingerprints then
match and it runs only curriculum -> WMSS, after which the trial evaluates the WMSS model alone
on the validation split (``data.validation_fraction`` / ``data.validation`` / the demo world's
``validation.jsonl``), never on ``data.eval``: the test set is read only by the final eval phase,
after the choice. A config without a validation split is refused before anything runs.

Usage: ``wmss tune CONFIG`` or ``python -m jobs.tune --config CONFIG`` on a cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from wmss_ray.config import WMSSConfig

from wmss_ray.config_loading import config_from_dict
from wmss_ray.data.ray_corpus import validation_eval_input
from wmss_ray.data.splits import has_validation

SHARED_PHASES = ("data", "phase0", "tokenize", "sft", "score_1")
NO_VALIDATION = ("a tune sweep selects a trial, so it needs a validation split apart from data.eval (the "
                 "test set): set data.validation_fraction (carved from data.train) or data.validation")


def build_param_space(search_space: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Config ``tune.search_space`` -> Ray Tune param space (keys stay dotted)."""
    from ray import tune

    make = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](values) for key, spec in search_space.items() for kind, values in spec.items()}


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


def run_trial(base: WMSSConfig, params: dict[str, Any], trial_name: str) -> dict[str, float]:
    """One trial, without Ray Tune around it (tests call this directly)."""
    from wmss_ray.evaluation import evaluate_models
    from wmss_ray.pipeline import run_pipeline

    cfg = trial_config(base, params, trial_name)
    trial_dir = Path(cfg.run_dir()).resolve()
    link_shared_phases(Path(base.run_dir()).resolve(), trial_dir)
    outputs = run_pipeline(cfg, until="wmss_1")
    validation = validation_eval_input(cfg, outputs)
    if validation is None:
        raise ValueError(NO_VALIDATION)
    res = evaluate_models({"WMSS": outputs["wmss_1"]["model_dir"]}, validation, cfg,
                          str(trial_dir / "validation"), eval_set="validation")["WMSS"]
    return {"validation_accuracy": float(res.accuracy), "validation_loss": float(res.loss),
            "n_validation": int(res.n)}


def run_sweep(base: WMSSConfig):
    """Run the shared phases once, then the Tune trials; returns the Ray Tune ResultGrid."""
    from ray import tune

    from wmss_ray import storage
    from wmss_ray.cluster import ensure_ray
    from wmss_ray.pipeline import run_pipeline

    if storage.is_remote(base.run_dir()):  # trials symlink the base run's phase directories
        raise ValueError(f"run.storage {storage.redact(base.run.storage)}: tune sweeps need a local or "
                         "shared-filesystem run.storage (trials link the base run's phases); "
                         "object storage works for wmss run / submit")
    if not has_validation(base):
        raise ValueError(NO_VALIDATION)
    ensure_ray()
    run_pipeline(base, until="score_1")
    base_dict = base.to_dict()

    def trainable(params: dict[str, Any]) -> dict[str, float]:
        name = tune.get_context().get_trial_name()
        return run_trial(config_from_dict(base_dict), params, name)

    storage = str(Path(base.run_dir()).resolve() / "tune")
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": base.tune.cpus_per_trial}),
        param_space=build_param_space(base.tune.search_space),
        tune_config=tune.TuneConfig(num_samples=base.tune.num_samples, metric=base.tune.metric,
                                    mode=base.tune.mode, max_concurrent_trials=base.tune.max_concurrent),
        run_config=tune.RunConfig(storage_path=storage, name="sweep"),
    )
    return tuner.fit()


def summarize(grid) -> str:
    """A fixed-width table of the trials, best first."""
    rows = []
    for r in grid:
        if r.metrics:
            params = {k: v for k, v in (r.config or {}).items()}
            rows.append((r.metrics.get("validation_accuracy", float("nan")),
                         r.metrics.get("validation_loss", float("nan")), params))
    rows.sort(key=lambda x: -x[0])
    lines = ["trials on the validation split (data.eval, the test set, is not read by the sweep)",
             f"{'accuracy':>9} {'loss':>8}  params"]
    lines += [f"{a:9.3f} {l:8.4f}  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in p.items()) for a, l, p in rows]
    return "\n".join(lines)
