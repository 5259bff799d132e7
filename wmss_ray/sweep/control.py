"""The sweep's one SFT-continued control, shared by every trial, and the paired comparisons with it.

The control is SFT from M1 for exactly as many optimizer steps as a trial's WMSS phase took
(equal compute, like the pipeline's ``sft_continued`` phase, whose training it shares:
``phases.train_sft_continued``). It is a :class:`~wmss_ray.phases.Phase` like any other,
``sft_continued`` under the run dir ``<run>/tune`` (``<run>/tune/sft_continued/``), run by the
pipeline's runner (``pipeline.run_phases``): trained once, after the trials, skipped when it
completed with the same inputs (the base run's SFT, ``run``/``training``/``scaling``/``evaluation``
and the step count), resumed when interrupted; then evaluated once on the whole validation split
(``sft_continued/validation/eval_SFT-continued.jsonl``).
Each completed trial is then compared problem by problem with it: ``d_i`` = the trial's
accuracy on problem ``i`` (mean over its ``tune.seeds``) minus the control's; the table gets
``mean(d)`` with a paired bootstrap 95 % CI and the sign-flip p-value (= exact McNemar for one
seed). A trial whose WMSS took another number of steps (a swept ``curriculum.sample_multiplier``
or ``dedup``) is not equal compute and gets no difference.

After selection, :func:`final_heldout` evaluates the best configuration (each seed's model) and
the control once on ``data.eval``, the test set no choice has seen: ``<run>/tune/final.json``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from wmss_ray.config.names import SFT_CONTINUED, SFT_CONTINUED_LABEL
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.console import get_console
from wmss_ray.sweep.trial import VALIDATION_DIR, seed_run_dirs

FINAL = "final.json"
PAIRED_KEYS = ("diff_vs_sft", "diff_ci_low", "diff_ci_high", "p_value")


def base_outputs(base: WMSSConfig) -> dict[str, Any]:
    """The base run's phase outputs up to scoring (completed before the trials: only read here)."""
    from wmss_ray.pipeline import run_pipeline

    return run_pipeline(base, until="score_1")


def control_steps(rows: list[dict[str, Any]]) -> int | None:
    """The step count of most completed trials (the control's equal compute); None without one."""
    steps = Counter(int(r["step"]) for r in rows if r["status"] == "completed" and r.get("step"))
    return steps.most_common(1)[0][0] if steps else None


def control_phase(steps: int):
    """The control as a pipeline phase: SFT-continued for ``steps`` steps from the base run's M1,
    then its whole-validation-split evaluation (output ``validation``: the per-problem file)."""
    from wmss_ray.phases import Phase, train_sft_continued

    def run(ctx) -> dict[str, Any]:
        from wmss_ray.stages.evaluate import evaluate_models
        from wmss_ray.stages.tokenize import validation_eval_input

        get_console().line(f"[wmss] tune: the shared control, {SFT_CONTINUED_LABEL} for {steps} steps ...")
        result = train_sft_continued(ctx, steps, epochs=ctx.cfg.training.wmss_epochs)
        out = storage.join(ctx.phase_dir(SFT_CONTINUED), VALIDATION_DIR)
        evaluate_models({SFT_CONTINUED_LABEL: result["outputs"]["model_dir"]},
                        validation_eval_input(ctx.cfg, ctx.outputs), ctx.cfg, out, eval_set="validation")
        result["outputs"]["validation"] = storage.join(out, f"eval_{SFT_CONTINUED_LABEL}.jsonl")
        return result

    return Phase(SFT_CONTINUED, ["sft"], ["run", "training", "scaling", "evaluation"], run, extra={"steps": steps},
                 planned_steps=lambda ctx: steps)


def ensure_control(base: WMSSConfig, outputs: dict[str, Any], root: str, steps: int) -> str:
    """Run the control phase in ``root`` (= ``<run>/tune``) with the pipeline's runner (skipped
    when done with the same inputs, resumed when interrupted); returns its per-problem
    validation file. ``outputs``: the base run's phases up to scoring."""
    from wmss_ray.io.manifest import read_manifest
    from wmss_ray.pipeline import RunContext, run_phases

    ctx = RunContext(base, run_dir=str(root))
    ctx.outputs = dict(outputs)
    ctx.fingerprints["sft"] = read_manifest(storage.join(storage.location(base.run_dir()), "sft")).fingerprint
    return run_phases(ctx, [control_phase(steps)])[SFT_CONTINUED]["validation"]


def _correct_by_id(path: str) -> dict[str, bool]:
    from wmss_ray.stages.evaluate import read_per_sample

    return {str(r["sample_id"]): bool(r["correct"]) for r in read_per_sample(path)}


def paired_vs_control(seed_files: list[str], control_file: str, seed: int = 0) -> dict[str, float]:
    """``diff_vs_sft`` (mean per-problem accuracy difference, trial over its seeds minus the
    control), its paired bootstrap 95 % CI and the sign-flip p-value, over the shared problems."""
    import numpy as np

    from wmss_ray.stages.stats import paired_bootstrap_ci, sign_flip_p_value

    control = _correct_by_id(control_file)
    seeds = [_correct_by_id(f) for f in seed_files]
    ids = [i for i in control if all(i in s for s in seeds)]
    a = np.array([np.mean([s[i] for s in seeds]) for i in ids], dtype=np.float64)  # [n] in [0, 1]
    b = np.array([control[i] for i in ids], dtype=np.float64)
    lo, hi = paired_bootstrap_ci(a, b, seed=seed)
    return {"diff_vs_sft": float(a.mean() - b.mean()) if ids else math.nan, "diff_ci_low": lo, "diff_ci_high": hi,
            "p_value": sign_flip_p_value(a - b, seed=seed)}


def add_paired(base: WMSSConfig, outputs: dict[str, Any], rows: list[dict[str, Any]], root: str) -> str | None:
    """Train/evaluate the control if a trial completed and add :data:`PAIRED_KEYS` to each
    completed, equal-compute row (in place); returns the control's validation file."""
    steps = control_steps(rows)
    if steps is None:
        return None
    control = ensure_control(base, outputs, root, steps)
    for r in rows:
        files = [storage.join(d, VALIDATION_DIR, "eval_WMSS.jsonl") for d in seed_run_dirs(root, r["trial"], base.tune.seeds)]
        if r["status"] == "completed" and int(r.get("step") or 0) == steps and all(map(storage.exists, files)):
            r.update(paired_vs_control(files, control, seed=base.run.seed))
    return control


def final_heldout(base: WMSSConfig, outputs: dict[str, Any], best: dict[str, Any],
                  root: str) -> dict[str, Any] | None:
    """The best trial's models (one per seed) and the control, once on ``data.eval`` with a paired
    test per seed; written to ``<root>/final.json`` (reused when it is for the same trial). None
    without a ``data.eval`` or a control."""
    from wmss_ray.io.manifest import read_manifest
    from wmss_ray.stages.evaluate import evaluate_models
    from wmss_ray.stages.stats import paired_test_per_sample

    path = storage.join(root, FINAL)
    old = read_final(root)
    if old is not None and old.get("trial") == best["trial"]:
        return old
    eval_path = outputs["data"]["eval"] if base.models.demo else base.data.eval
    control = read_manifest(storage.join(root, SFT_CONTINUED))
    if not eval_path or control is None or control.status != "completed":
        return None
    models = {SFT_CONTINUED_LABEL: control.outputs["model_dir"]}
    for i, d in enumerate(seed_run_dirs(root, best["trial"], base.tune.seeds)):
        models[f"WMSS seed {i}"] = read_manifest(storage.join(d, "wmss_1")).outputs["model_dir"]
    get_console().line(f"[wmss] tune: the best configuration ({best['trial']}) and {SFT_CONTINUED_LABEL} "
                       "on data.eval, once ...")
    res = evaluate_models(models, eval_path, base, storage.join(root, "final"), eval_set="test")
    summary = json.loads(storage.read_text(storage.join(root, "final", "eval_results.json")))
    ctrl = res[SFT_CONTINUED_LABEL]
    wmss = [(name, r) for name, r in res.items() if name != SFT_CONTINUED_LABEL]
    final = {"trial": best["trial"], "params": best["params"], "eval_set": summary["eval_set"],
             "engine": ctrl.engine, "sampling": ctrl.sampling,
             SFT_CONTINUED: {"accuracy": ctrl.accuracy, "loss": ctrl.loss, "avg_at_k": ctrl.avg_at_k,
                             "pass_at_k": ctrl.pass_at_k},
             "wmss": [{"seed": i, "accuracy": r.accuracy, "loss": r.loss, "avg_at_k": r.avg_at_k,
                       "pass_at_k": r.pass_at_k} for i, (_, r) in enumerate(wmss)],
             "paired": [paired_test_per_sample(r.per_sample, ctrl.per_sample, name_a=name, name_b=SFT_CONTINUED_LABEL,
                                               seed=base.run.seed).to_dict() for name, r in wmss]}
    storage.write_text(path, json.dumps(final, indent=2, allow_nan=True))
    return final


def read_final(root: str) -> dict[str, Any] | None:
    """``<root>/final.json`` (None before a final held-out evaluation); ``root`` a path or a URI."""
    path = storage.join(str(root), FINAL)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def final_lines(final: dict[str, Any] | None) -> list[str]:
    """What the sweep prints last: the best configuration on the held-out test set."""
    if not final:
        return ["held-out test: not evaluated (no completed trial, no control, or no data.eval)"]
    es = final["eval_set"]
    lines = [f"held-out test ({es['n']} problems of data.eval, read once, after the choice): best trial "
             f"{final['trial']}, {SFT_CONTINUED_LABEL} {final[SFT_CONTINUED]['accuracy']:.3f}"]
    for p in final["paired"]:
        lines.append(f"  {p['name_a']}: {p['acc_a']:.3f}, {p['name_a']} - {p['name_b']} = {100 * p['diff']:+.1f} points "
                     f"[{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}] 95% CI, McNemar p = {p['p_value']:.3g}")
    return lines
