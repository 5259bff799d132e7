"""The phases of a WMSS run: what each one does and what its result depends on.

K = cfg.run.iterations (paper: 1). Phase order::

    data -> phase0 -> tokenize -> sft -> score_1 -> curriculum_1 -> wmss_1
         [-> score_2 -> curriculum_2 -> wmss_2 ...] -> sft_continued -> eval -> report

``data`` and ``phase0`` exist only in the demo world (the synthetic task; pre-training M0).
``score_t`` scores the train corpus with weak = M_{t-1} and strong = M_t; ``wmss_t`` trains
M_{t+1} from M_t against weak M_{t-1}. ``sft_continued`` is the equal-compute control: SFT continued
from M1 for exactly as many optimizer steps as all WMSS iterations together took.

:func:`build_phases` lists them for a config: each a :class:`Phase` (its upstream phases, the
config sections its fingerprint hashes, the function that runs it on a :class:`RunContext`).
The runner that skips, resumes and records them is ``wmss_ray/pipeline.py``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from wmss_ray.config.names import CONTROL_ARM_LABELS, SFT_CONTINUED, SFT_CONTINUED_LABEL
from wmss_ray.config.schema import ADDED_KEYS, TRAINING_LAYOUT, WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.manifest import linked_phase, phase_fingerprint, read_manifest
from wmss_ray.training.controls import arm_sections, arm_steps

log = logging.getLogger("wmss_ray.phases")


@dataclass
class Phase:
    name: str
    needs: list[str]  # upstream phases whose outputs this one reads
    sections: list[str]  # config sections its result depends on
    run: Callable[["RunContext"], dict[str, Any]]  # returns {"outputs": {...}, "counts": {...}}
    # dotted keys inside ``sections`` that do not change this phase's result; they are nulled
    # (not dropped) before hashing, so a run that never set them keeps its fingerprints
    ignores: tuple[str, ...] = ()
    # inputs from outside the config and the phases (the sweep control's step count): hashed
    # only when given, so the pipeline's phases keep their fingerprints
    extra: dict[str, Any] | None = None
    # dotted keys of how a training phase is executed (world size, batch split, ZeRO stage, weak
    # placement): hashed like the others, but a run may resume at other values of them with the
    # fingerprint it started with, when the global batch is the same (pipeline.resumed_fingerprint)
    layout: tuple[str, ...] = ()
    # a training phase whose step count follows from upstream phases rather than the config (the
    # equal-compute controls): that count, for its start line and progress (stages/progress.py)
    planned_steps: Callable[["RunContext"], int] | None = None

    def fingerprint(self, cfg_dict: dict[str, Any], prints: dict[str, str]) -> str:
        """This phase's fingerprint for ``cfg_dict`` (``WMSSConfig.fingerprint_dict()``) and the
        upstream ``prints`` (``io.manifest.phase_fingerprint``). An ignored key that is one of
        ``ADDED_KEYS`` is dropped rather than nulled: runs made before it existed do not have it,
        so whatever it is set to, they keep their fingerprints."""
        added = [k for k in self.ignores if k in ADDED_KEYS]
        if added:
            cfg_dict = copy.deepcopy(cfg_dict)
            for dotted in added:
                *parents, leaf = dotted.split(".")
                node = cfg_dict
                for part in parents:
                    node = node.get(part, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node.pop(leaf, None)
        nulled = tuple(k for k in self.ignores if k not in ADDED_KEYS)
        return phase_fingerprint(self.name, self.sections, self.needs, cfg_dict, prints, nulled, self.extra)


class RunContext:
    """What phases share: the config, the run dir, and finished phases' outputs."""

    def __init__(self, cfg: WMSSConfig, train_options: dict[str, dict[str, Any]] | None = None,
                 run_dir: str | None = None):
        self.cfg = cfg
        self.run_dir = storage.location(run_dir or cfg.run_dir())  # absolute local path or URI
        self.outputs: dict[str, dict[str, Any]] = {}
        self.fingerprints: dict[str, str] = {}  # by phase name: a training phase binds its checkpoints to it
        # extra train_phase arguments by phase name that do not change its result (a tune
        # trial's in-run validation and its report to Tune): not part of any fingerprint
        self.train_options = train_options or {}

    def phase_dir(self, name: str) -> str:
        d = storage.join(self.run_dir, name)
        if storage.is_remote(d):  # a reference to another run's phase (manifest.link_phase) is read there
            return linked_phase(d) or d
        storage.make_dir(d)  # object stores have no directories to create
        return d

    def out(self, phase: str, key: str) -> Any:
        return self.outputs[phase][key]

    def model(self, index: int) -> str:
        """Directory of model M_index (M0 = base, M1 = SFT, M_{t+1} = WMSS iteration t)."""
        if index == 0:
            return self.out("phase0", "model_dir") if "phase0" in self.outputs else self.cfg.models.base
        if index == 1:
            return self.out("sft", "model_dir")
        return self.out(f"wmss_{index - 1}", "model_dir")

    def weak_model(self, t: int) -> str:
        """The weak agent of iteration ``t``: M_{t-1}, or ``models.weak`` for t = 1 when it is set."""
        if t == 1 and self.cfg.models.weak:
            return self.cfg.models.weak
        return self.model(t - 1)

    def tokenizer_source(self) -> str:
        """The model directory whose tokenizer the corpus is tokenised with (M0, else M1)."""
        return self.model(0) or self.cfg.models.strong


# ----------------------------------------------------------------------------- phases


def _phase_data(ctx: RunContext) -> dict[str, Any]:
    from wmss_ray.data.synthetic import write_demo_corpus

    out = ctx.phase_dir("data")
    with storage.staged_dir(out) as local:
        paths = write_demo_corpus(ctx.cfg.data.demo, ctx.cfg.run.seed, local)
    return {"outputs": {split: storage.join(out, os.path.basename(p)) for split, p in paths.items()},
            "counts": {"validation": ctx.cfg.data.demo.n_validation}}


def _phase0(ctx: RunContext) -> dict[str, Any]:
    from wmss_ray.training.pretrain import pretrain_base

    out = ctx.phase_dir("phase0")
    with storage.staged_dir(out) as local:
        pretrain_base(ctx.cfg, os.path.join(local, "model"))
    return {"outputs": {"model_dir": storage.join(out, "model")}}


def _train_corpus(ctx: RunContext) -> str:
    return ctx.out("data", "train") if ctx.cfg.models.demo else ctx.cfg.data.train


def eval_corpus(ctx: RunContext) -> str | None:
    return ctx.out("data", "eval") if ctx.cfg.models.demo else ctx.cfg.data.eval


def _phase_tokenize(ctx: RunContext) -> dict[str, Any]:
    from wmss_ray.stages.tokenize import tokenize_corpus

    out, extra = str(ctx.phase_dir("tokenize")), {}
    pair = (ctx.weak_model(1), ctx.cfg.models.strong)
    if all(pair):  # M1 is given (no SFT): iteration 1's scores come out of the same execution
        from wmss_ray.stages.score import scoring_key, tokenize_and_score

        res, scored = tokenize_and_score(ctx.cfg, ctx.tokenizer_source(), _train_corpus(ctx), out, *pair,
                                         storage.join(out, "score_1"))
        extra = {"scores_1": scored.scores_path, "scores_1_key": scoring_key(ctx.cfg, *pair)}
    else:
        res = tokenize_corpus(ctx.cfg, ctx.tokenizer_source(), _train_corpus(ctx), out)
    return {"outputs": {"tokenized": res.tokenized_path, "rejects": res.rejects_path,
                        "validation": res.validation_path, **extra}, "counts": res.counts}


def _phase_sft(ctx: RunContext) -> dict[str, Any]:
    if ctx.cfg.models.strong:  # an already fine-tuned M1 was given: nothing to train
        return {"outputs": {"model_dir": ctx.cfg.models.strong, "steps": 0}}
    from wmss_ray.training.trainer import train_phase

    res = train_phase(
        ctx.cfg, "sft", strong_init=ctx.model(0), weak_init=None,
        tokenized_path=ctx.out("tokenize", "tokenized"), sampled_ids_path=None,
        out_dir=str(ctx.phase_dir("sft")), epochs=ctx.cfg.training.sft_epochs, fingerprint=ctx.fingerprints["sft"],
    )
    return _train_outputs(res)


def _train_outputs(res: Any) -> dict[str, Any]:
    out = {
        "outputs": {"model_dir": res.model_dir, "metrics": res.metrics_path, "steps": res.steps},
        "counts": {"steps": res.steps, **{k: v for k, v in (res.final_metrics or {}).items()}},
    }
    if res.peak is not None:  # keep_peak only: the outputs of any other run are as they were
        out["outputs"]["peak"] = res.peak
    if res.model_dir is None:  # stopped short of its end (train_options stop_after): resumable, not done
        out["status"] = "stopped"
    return out


def _phase_score(t: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        from wmss_ray.stages.score import reuse_scores, score_tokenized, scoring_key

        tok, out = ctx.outputs["tokenize"], str(ctx.phase_dir(f"score_{t}"))
        if t == 1 and tok.get("scores_1_key") == scoring_key(ctx.cfg, ctx.weak_model(t), ctx.model(t)):
            res = reuse_scores(tok["scores_1"], out)  # scored while tokenising, by this pair and settings
        else:
            res = score_tokenized(ctx.cfg, weak_model=ctx.weak_model(t), strong_model=ctx.model(t),
                                  tokenized_path=ctx.out("tokenize", "tokenized"), out_dir=out)
        return {"outputs": {"scores": res.scores_path}, "counts": res.counts}

    return run


def _phase_curriculum(t: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        from wmss_ray.stages.curriculum import sample_curriculum

        res = sample_curriculum(ctx.cfg, ctx.out(f"score_{t}", "scores"), ctx.phase_dir(f"curriculum_{t}"),
                                seed=ctx.cfg.curriculum_seed + t)
        return {"outputs": {"sampled_ids": res.sampled_ids_path, "weights": res.weights_path}, "counts": res.counts}

    return run


def _phase_wmss(t: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        from wmss_ray.training.trainer import train_phase

        res = train_phase(
            ctx.cfg, "wmss", strong_init=ctx.model(t), weak_init=ctx.weak_model(t),
            tokenized_path=ctx.out("tokenize", "tokenized"),
            sampled_ids_path=ctx.out(f"curriculum_{t}", "sampled_ids"),
            out_dir=str(ctx.phase_dir(f"wmss_{t}")), epochs=ctx.cfg.training.wmss_epochs,
            fingerprint=ctx.fingerprints[f"wmss_{t}"], **ctx.train_options.get(f"wmss_{t}", {}),
        )
        return _train_outputs(res)

    return run


def wmss_steps(ctx: RunContext) -> int:
    """The optimizer steps all WMSS iterations of the run took (the controls' equal compute)."""
    return sum(int(ctx.out(f"wmss_{t}", "steps")) for t in range(1, ctx.cfg.run.iterations + 1))


def _phase_sft_continued(ctx: RunContext) -> dict[str, Any]:
    """Equal compute: SFT from M1 for exactly the optimizer steps all WMSS iterations took."""
    return train_sft_continued(ctx, wmss_steps(ctx), epochs=ctx.cfg.training.wmss_epochs * ctx.cfg.run.iterations)


def train_sft_continued(ctx: RunContext, steps: int, epochs: int) -> dict[str, Any]:
    """The equal-compute control's training, in ``<ctx.run_dir>/sft_continued/``: SFT from M1 for
    exactly ``steps`` optimizer steps (the pipeline's phase, and the sweep's shared control)."""
    from wmss_ray.training.trainer import train_phase

    res = train_phase(
        ctx.cfg, "sft", strong_init=ctx.model(1), weak_init=None,
        tokenized_path=ctx.out("tokenize", "tokenized"), sampled_ids_path=None,
        out_dir=str(ctx.phase_dir(SFT_CONTINUED)), epochs=epochs, exact_steps=steps,
        fingerprint=ctx.fingerprints[SFT_CONTINUED], **ctx.train_options.get(SFT_CONTINUED, {}),
    )
    return _train_outputs(res)


def control_steps(arm: str, ctx: RunContext) -> int:
    """Control arm ``arm``'s optimizer steps after the run's WMSS (``training.controls.arm_steps``)."""
    return arm_steps(arm, wmss_steps(ctx), ctx.cfg.mix.mode, ctx.cfg.mix.weak_source)


def _phase_control(arm: str) -> Callable[[RunContext], dict[str, Any]]:
    """A control arm (``controls.arms``, ``training/controls.py``): SFT from M1 in ``<run>/<arm>/``
    for its step count, with its one changed setting."""
    def run(ctx: RunContext) -> dict[str, Any]:
        from wmss_ray.config.loading import config_from_dict
        from wmss_ray.training.controls import arm_overrides
        from wmss_ray.training.trainer import train_phase

        cfg = ctx.cfg
        res = train_phase(
            config_from_dict(cfg.to_dict(), arm_overrides(arm, cfg)), "sft", strong_init=ctx.model(1),
            weak_init=None, tokenized_path=ctx.out("tokenize", "tokenized"), sampled_ids_path=None,
            out_dir=str(ctx.phase_dir(arm)), epochs=cfg.training.wmss_epochs * cfg.run.iterations,
            exact_steps=control_steps(arm, ctx), fingerprint=ctx.fingerprints[arm], **ctx.train_options.get(arm, {}))
        return _train_outputs(res)

    return run


def _phase_eval(ctx: RunContext) -> dict[str, Any]:
    from wmss_ray.stages.evaluate import evaluate_models

    eval_path = eval_corpus(ctx)
    if not eval_path:
        return {"outputs": {"skipped": "no data.eval corpus"}}
    k = ctx.cfg.run.iterations
    models = {"M0": ctx.model(0)} if ctx.model(0) else {}
    if ctx.cfg.models.weak and ctx.cfg.models.weak != ctx.model(0):
        models["weak"] = ctx.cfg.models.weak
    models["M1"] = ctx.model(1)
    if SFT_CONTINUED in ctx.outputs:
        models[SFT_CONTINUED_LABEL] = ctx.out(SFT_CONTINUED, "model_dir")
    for arm in ctx.cfg.controls.arms:
        models[CONTROL_ARM_LABELS[arm]] = ctx.out(arm, "model_dir")
    models["WMSS"] = ctx.model(k + 1)
    # data.eval is the test set: read here only, after every choice (tune selects on validation).
    results = evaluate_models(models, eval_path, ctx.cfg, str(ctx.phase_dir("eval")), eval_set="test")
    table = {n: {"accuracy": r.accuracy, "loss": r.loss, "n": r.n, "model_dir": r.model_dir, "engine": r.engine,
                 "n_rejected": r.n_rejected, "sampling": r.sampling, "avg_at_k": r.avg_at_k, "pass_at_k": r.pass_at_k,
                 "brier": r.brier, "ece": r.ece}
             for n, r in results.items()}
    results_path = storage.join(ctx.phase_dir("eval"), "eval_results.json")
    summary = json.loads(storage.read_text(results_path))
    return {"outputs": {"results": results_path, "models": table,
                        "checker": summary["checker"], "eval_set": summary["eval_set"]}}


def _phase_report(ctx: RunContext) -> dict[str, Any]:
    from wmss_ray.stages.report_storage import write_report_at

    k = ctx.cfg.run.iterations
    results = {
        "models": ctx.outputs.get("eval", {}).get("models", {}),
        "checker": ctx.outputs.get("eval", {}).get("checker"),
        "eval_set": ctx.outputs.get("eval", {}).get("eval_set"),
        "counts": {"validation": _validation_count(ctx)},
        "phases": {
            SFT_CONTINUED: ctx.outputs.get(SFT_CONTINUED, {}).get("metrics"),
            "wmss": ctx.outputs.get(f"wmss_{k}", {}).get("metrics"),
        },
        "scores": ctx.outputs.get(f"score_{k}", {}).get("scores"),
        "weights": ctx.outputs.get(f"curriculum_{k}", {}).get("weights"),
        "eval_dir": storage.join(ctx.run_dir, "eval"),
        "config": ctx.cfg.to_dict(),
        "config_hash": ctx.cfg.config_hash(),
        "run_dir": ctx.run_dir,
        "timings": _timings(ctx, [n for n in ctx.outputs if n != "report"]),  # every phase before this one
    }
    return {"outputs": {"report": write_report_at(ctx.run_dir, results, ctx.phase_dir("report"))}}


def _timings(ctx: RunContext, names: list[str]) -> dict[str, Any]:
    from wmss_ray.stages.timings import collect_timings

    return collect_timings(ctx.run_dir, names, ctx.cfg.to_dict())


def write_run_summary(ctx: RunContext) -> dict[str, Any]:
    """``<run>/summary.json``: every phase's timings (``stages/timings.py``) and the eval table;
    returns the timings (the console's final table)."""
    from wmss_ray.stages.timings import write_summary

    timings = _timings(ctx, list(ctx.outputs))
    write_summary(ctx.run_dir, timings, (ctx.outputs.get("eval") or {}).get("models"))
    return timings


def _validation_count(ctx: RunContext) -> int | None:
    """Rows of the validation split, for the report (None without one)."""
    tok = read_manifest(storage.join(ctx.run_dir, "tokenize"))
    if tok and tok.counts.get("rows_validation"):
        return int(tok.counts["rows_validation"])
    if ctx.cfg.data.validation:
        return None  # a user corpus: counted when it is evaluated
    return ctx.cfg.data.demo.n_validation if ctx.cfg.models.demo else None


def build_phases(cfg: WMSSConfig) -> list[Phase]:
    """The ordered phase list for this config."""
    demo = cfg.models.demo
    k = cfg.run.iterations
    no_weak = ("models.weak",)  # the weak override only matters from score_1 on
    # How a training run is executed, not what it computes: changing them resumes a crashed run
    # (say, with checkpoints more often) instead of discarding its checkpoints.
    how = ("training.checkpoint_every", "training.checkpoints_to_keep", "training.max_failures",
           "training.max_preemption_failures", "training.staging_dir")
    layout = TRAINING_LAYOUT
    phases: list[Phase] = []
    if demo:
        phases.append(Phase("data", [], ["run.seed", "data.demo"], _phase_data))
        phases.append(Phase("phase0", ["data"], ["run.seed", "models", "phase0", "data.demo"], _phase0, no_weak))
    first = ["data", "phase0"] if demo else []
    # how the rows are laid out in files, not which rows: changing it keeps the tokenised data
    phases.append(Phase("tokenize", first, ["data", "models"], _phase_tokenize, no_weak + ("data.rows_per_file",)))
    # Listed only when set, so runs without a training seed of their own keep their fingerprints.
    seed = ["run.seed", "run.train_seed"] if cfg.run.train_seed is not None else ["run.seed"]
    phases.append(Phase("sft", ["tokenize"], [*seed, "models", "training", "scaling"], _phase_sft, no_weak + how,
                        layout=layout))
    prev_model = "sft"
    for t in range(1, k + 1):
        weak_src = "sft" if t == 2 else (f"wmss_{t - 2}" if t > 2 else first[-1] if first else "tokenize")
        # Listed only when set, so runs without the override keep their fingerprints.
        weak_key = ["models.weak"] if t == 1 and cfg.models.weak else []
        phases.append(Phase(f"score_{t}", ["tokenize", prev_model, weak_src], ["scoring", *weak_key], _phase_score(t),
                            ("scoring.logits_mb",)))  # how many rows per forward: the scores do not change
        phases.append(Phase(f"curriculum_{t}", [f"score_{t}"], [*seed, "curriculum"], _phase_curriculum(t)))
        phases.append(Phase(f"wmss_{t}", [f"curriculum_{t}", prev_model, weak_src],
                            [*seed, "mix", "training", "scaling", *weak_key], _phase_wmss(t), how,
                            layout=layout))
        prev_model = f"wmss_{t}"
    if cfg.evaluation.sft_continued:
        phases.append(Phase(SFT_CONTINUED, ["sft", prev_model], [*seed, "training", "scaling"],
                            _phase_sft_continued, how, layout=layout, planned_steps=wmss_steps))
    for arm in cfg.controls.arms:  # after WMSS: their step counts follow from its steps
        phases.append(Phase(arm, ["sft", prev_model], [*seed, "training", "scaling", *arm_sections(arm)],
                            _phase_control(arm), how, layout=layout, planned_steps=functools.partial(control_steps, arm)))
    eval_needs = [p.name for p in phases if p.name in ("sft", SFT_CONTINUED, prev_model, *cfg.controls.arms)] + first
    phases.append(Phase("eval", eval_needs, ["evaluation", "data.eval", "data.reference_column", "data.supervise"],
                        _phase_eval, ("evaluation.logits_mb",)))
    phases.append(Phase("report", ["eval"], [], _phase_report))
    return phases
