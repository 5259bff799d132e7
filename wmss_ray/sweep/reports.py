"""A tune trial's reports: :func:`trial_report`, the one shape of every report a trial makes
(one seed or several, in-run, chunked or final; ``wmss_ray/sweep/trial.py``), and the route of a
one-seed trial's intermediate reports from inside its Train run to Ray Tune.

The trial's WMSS phase validates itself every ``tune.eval_every`` steps
(``wmss_ray/training/validation.py``) and puts the metrics into that step's
``ray.train.report``; this Ray Train callback (run by the Train controller) forwards those
reports, and only those, to the trial's Tune session, where ASHA acts on them while the run goes
on. Training reports without validation metrics (logged steps, checkpoints) stay in Ray Train.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from wmss_ray.training.validation import VALIDATION_KEYS


def mean_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the seeds' metrics: mean accuracy and loss, ``accuracy_std`` (ddof 1; 0 for one
    seed), ``seeds``, and the (shared) ``n_validation``."""
    from wmss_ray.stages.stats import mean_and_spread

    acc, std, _, _ = mean_and_spread(m["validation_accuracy"] for m in per_seed)
    loss = mean_and_spread(m["validation_loss"] for m in per_seed)[0]
    return {"validation_accuracy": acc, "validation_loss": loss, "accuracy_std": std, "seeds": len(per_seed),
            "n_validation": per_seed[0]["n_validation"]}


def trial_report(per_seed: list[dict[str, Any]], step: int, final: bool, **extra: Any) -> dict[str, Any]:
    """Every report a trial makes, whatever its path (in-run, chunked, final): the keys of
    :func:`mean_over_seeds` over ``per_seed`` (one dict of :data:`VALIDATION_KEYS` per seed), the
    optimizer ``step`` (ASHA's time), ``final`` (the whole validation split) and ``extra`` keys."""
    return {**mean_over_seeds([{k: m[k] for k in VALIDATION_KEYS} for m in per_seed]), "step": int(step),
            **extra, "final": final}


class ValidationToTune(TuneReportCallback):
    """``TuneReportCallback`` for validation reports only (needs a Tune session at creation)."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and VALIDATION_KEYS[0] in metrics[0]:
            super().after_report(run_context, [trial_report([metrics[0]], metrics[0]["step"], final=False)], None)
