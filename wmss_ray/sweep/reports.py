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


def trial_line(event: str, trial_id: str, config: dict[str, Any] | None, result: dict[str, Any] | None,
               metric: str) -> str:
    """The console's line for a trial's start, end or error (pure: ``TrialLines`` prints it)."""
    if event == "start":
        knobs = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (config or {}).items())
        return f"[wmss] tune: {trial_id} started: {knobs}"
    if event == "error":
        return f"[wmss] tune: {trial_id} failed (its error: <run>/logs/ and the trial's directory)"
    r = result or {}
    value = r.get(metric)
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"
    how = "done" if r.get("final") else "stopped early"
    return f"[wmss] tune: {trial_id} {how} at step {r.get('step', '?')}: {metric} {shown}"


def trial_lines_callback(metric: str):
    """A Ray Tune callback printing :func:`trial_line` on the console for each trial's start and end
    (the trials' own output runs in Ray workers, whose output goes to the log)."""
    from ray.tune import Callback

    from wmss_ray.io.console import get_console

    class TrialLines(Callback):
        # str(trial): the trial's name (the sweep names trials and their directories trial_<id>)
        def on_trial_start(self, iteration, trials, trial, **info):
            get_console().line(trial_line("start", str(trial), trial.config, None, metric))

        def on_trial_complete(self, iteration, trials, trial, **info):
            get_console().line(trial_line("complete", str(trial), None, trial.last_result, metric))

        def on_trial_error(self, iteration, trials, trial, **info):
            get_console().line(trial_line("error", str(trial), None, None, metric))

    return TrialLines()
