"""Ray Tune sweeps over the WMSS knobs (λ, α, β, γ, mode, ...).

Everything before the curriculum (data, pre-training, tokenisation, SFT, scoring) does not depend
on the swept keys (``mix.*`` and ``curriculum.*``, enforced by the config schema), so it runs once
in the base run directory. Each trial gets its own run directory ``<run_dir>/tune/trial_<id>/``
whose upstream phase directories are links to the base run's (``io.manifest.link_phase``: symbolic
links, or on object storage reference files ``<phase>.link`` holding the base phase's URI; the
runner never reruns a linked phase): the pipeline's
fingerprints then match and it runs only curriculum -> WMSS (with its reports, ``wmss_ray/sweep/trial.py``)
-> the WMSS model on the validation split (``data.validation_fraction`` / ``data.validation`` /
the demo world's ``validation.jsonl``), never on ``data.eval``: the test set is read only by the
final eval phase, after the choice. A config without a validation split is refused before
anything runs.

Search: ``tune.search`` random (Ray's variant generator), grid (every key enumerated) or optuna
(TPE, ``OptunaSearch``, seeded with ``run.seed``); ``tune.scheduler: asha`` stops trials on their
intermediate reports (``time_attr`` = the optimizer step). Concurrency: ``tune.max_concurrent``,
else as many trials as the cluster holds, each counted as its driver plus its Train workers
(Tune reserves only the driver; Train V2 asks for the workers later, so more trials than that
would wait on each other forever). Running ``wmss tune CONFIG`` again continues the same
experiment (``<run>/tune/sweep``, ``Tuner.restore``): finished trials are not rerun; errored ones
only with ``retry_errored``. ``tune.seeds`` runs each configuration over several curriculum
seeds (``wmss_ray/sweep/trial.py``). After the trials: one SFT-continued control and each trial's paired
difference with it on validation, then the best configuration once on ``data.eval``
(``wmss_ray/sweep/control.py``). Outputs: ``<run>/tune/results.csv``, ``curves.csv``, ``best.yaml``
(``wmss_ray/sweep/results.py``), ``final.json`` and the page ``page/index.html`` (``wmss_ray/sweep/page.py``).

``run.storage`` may be an object-store URI (``s3://bucket/runs``): then everything above is in the
bucket, Tune's experiment included (``RunConfig(storage_path, storage_filesystem)`` from
``io.storage.resolve_fs``, as Ray Train's checkpoints are), so a driver killed mid-sweep is
continued by ``wmss tune CONFIG`` from any machine that reaches the bucket (``Tuner.restore`` from
it); trials validate in their run as on a shared filesystem (``training.validation.node_copy``).

Usage: ``wmss tune CONFIG [--retry-errored]`` or ``python -m jobs.tune --config CONFIG``.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any

from wmss_ray.config.loading import config_from_dict, save_config
from wmss_ray.config.schema import WMSSConfig
from wmss_ray.data.splits import has_validation
from wmss_ray.io import storage
from wmss_ray.io.console import get_console
from wmss_ray.stages.trackers import tune_callbacks
from wmss_ray.sweep.reports import trial_lines_callback
from wmss_ray.sweep.trial import NO_VALIDATION, SHARED_PHASES, link_shared_phases, run_trial, sweep_root, trial_config

__all__ = ["SHARED_PHASES", "NO_VALIDATION", "build_param_space", "link_shared_phases", "trial_config",
           "run_trial", "run_sweep", "summarize", "trial_resources", "derive_max_concurrent",
           "check_same_sweep", "check_state_api"]
EXPERIMENT = "sweep"


def build_param_space(search_space: dict[str, dict[str, list[Any]]], search: str = "random") -> dict[str, Any]:
    """Config ``tune.search_space`` -> Ray Tune param space (keys stay dotted). Under
    ``search: grid`` a ``choice`` is enumerated like a ``grid``."""
    from ray import tune

    make = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "choice": tune.grid_search if search == "grid" else tune.choice, "grid": tune.grid_search}
    return {key: make[kind](values) for key, spec in search_space.items() for kind, values in spec.items()}


def make_search_alg(cfg: WMSSConfig):
    """OptunaSearch (TPE, seeded) for ``tune.search: optuna``; None: Ray's variant generator."""
    if cfg.tune.search != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.run.seed)


def make_scheduler(cfg: WMSSConfig):
    """ASHA on the optimizer step for ``tune.scheduler: asha``; None: run every trial to its end."""
    if cfg.tune.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
    max_t = t.max_steps or cfg.training.max_steps or 10_000
    return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(t.grace_period, max_t),
                         reduction_factor=t.reduction_factor)


def trial_resources(cfg: WMSSConfig) -> dict[str, float]:
    """What one trial holds at its peak: its driver plus its Train workers (plus a weak pool), or
    plus its evaluation actors when they ask for more (they run after training, not with it)."""
    sc, ev, p = cfg.scaling, cfg.evaluation, cfg.mix.pool
    train = {"CPU": sc.num_workers * sc.cpus_per_worker,
             "GPU": sc.num_workers * ((sc.gpus_per_worker or 1.0) if sc.use_gpu else 0.0)}
    if cfg.mix.placement == "pool":
        train["CPU"] += p.replicas * p.shards * p.cpus_per_actor
        train["GPU"] += p.replicas * p.shards * p.gpus_per_actor
    evaluation = {"CPU": ev.num_actors * ev.cpus_per_actor, "GPU": ev.num_actors * ev.gpus_per_actor}
    return {k: cfg.tune.cpus_per_trial * (k == "CPU") + max(train[k], evaluation[k]) for k in ("CPU", "GPU")}


def derive_max_concurrent(cfg: WMSSConfig, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent``, else the trials that fit the cluster at once; a cluster that cannot
    hold a single trial is an error naming what is missing."""
    need = trial_resources(cfg)
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    n = min(fits) if fits else 1
    if n < 1:
        have = ", ".join(f"{k} {cluster.get(k, 0.0):g}" for k in need)
        want = ", ".join(f"{k} {v:g}" for k, v in need.items())
        raise ValueError(f"a tune trial needs {want} (tune.cpus_per_trial + scaling.num_workers x "
                         f"scaling.cpus_per_worker/gpus_per_worker, or the evaluation actors) but the Ray "
                         f"cluster has {have}: not even one trial can be placed")
    return cfg.tune.max_concurrent or n


STATE_API_NEEDED = (
    "tune.scheduler asha stops trials while their Train runs are going; Ray Train frees a stopped "
    "run's worker placement group through Ray's State API (a PlacementGroupCleaner watching the "
    "controller), which this cluster does not serve ({error}), so every stopped trial would keep "
    "its CPUs/GPUs until the sweep ends: run Ray with its dashboard (ray.init / ray start default, "
    "KubeRay's head), or set tune.scheduler: none")


def check_state_api(cfg: WMSSConfig, list_actors=None) -> None:
    """Under ASHA, refuse a Ray cluster without the State API (see ``STATE_API_NEEDED``)."""
    if cfg.tune.scheduler != "asha":
        return
    if list_actors is None:
        from ray.util.state import list_actors
    import ray

    try:  # this process's cluster (several may run on one machine), asked for its dashboard
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=30, raise_on_missing_output=False)
    except Exception as err:  # RayStateApiException, or a connection error naming the dashboard
        raise RuntimeError(STATE_API_NEEDED.format(error=f"{type(err).__name__}: {str(err)[:200]}")) from err


def _check_trial_values(base: WMSSConfig) -> None:
    """Every swept value with the whole config (cross-section rules), before anything runs."""
    for key, spec in base.tune.search_space.items():
        for value in next(iter(spec.values())):
            config_from_dict(base.to_dict(), [f"{key}={value}"], source=f"tune.search_space {key}={value!r}")


SWEEP_CONFIG = "sweep_config.yaml"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v and k != "search_space"
                   else {f"{prefix}{k}": v})
    return out


def check_same_sweep(base: WMSSConfig, root: str) -> None:
    """A continued sweep must be the one that was started: the config saved at its start
    (``<run>/tune/sweep_config.yaml``, local or in the bucket) and this one must agree, else the
    error names the keys."""
    import yaml

    saved_path = storage.join(str(root), SWEEP_CONFIG)
    if not storage.exists(saved_path):
        return
    shown = storage.redact(saved_path)
    saved = _flat(config_from_dict(yaml.safe_load(storage.read_text(saved_path)), source=shown).to_dict())
    now = _flat(base.to_dict())
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"{storage.redact(storage.join(str(root), EXPERIMENT))} is a sweep started with another "
                         f"config ({', '.join(changed)} differ from {shown}); continuing it would mix the two: "
                         "restore those values, or choose another run.name")


def run_sweep(base: WMSSConfig, retry_errored: bool = False):
    """Run the shared phases once, then the Tune trials (or continue the sweep of this run dir);
    then :func:`finish_sweep` (the shared control, results, the held-out test, the page); returns
    the Ray Tune ResultGrid."""
    import ray
    from ray import tune

    from wmss_ray.cluster import ensure_ray
    from wmss_ray.pipeline import run_pipeline

    if not has_validation(base):
        raise ValueError(NO_VALIDATION)
    _check_trial_values(base)
    root = sweep_root(base)  # a local path or a URI: Tune's experiment, the trials, the results go there
    tune_fs, tune_root = storage.resolve_fs(root)  # as training/trainer.py gives Ray Train its storage
    path = posixpath.join(tune_root, EXPERIMENT)
    if storage.is_remote(root):  # before Ray starts: an unreachable bucket fails naming the URI
        storage.check_reachable(root)
    restoring = tune.Tuner.can_restore(path, storage_filesystem=tune_fs)
    if restoring:  # before any work: a changed config must not continue the old sweep
        check_same_sweep(base, root)
    ensure_ray()
    check_state_api(base)
    max_concurrent = derive_max_concurrent(base, ray.cluster_resources())
    run_pipeline(base, until="score_1")
    base_dict = base.to_dict()

    def trainable(params: dict[str, Any]) -> None:
        name = tune.get_context().get_trial_name()
        run_trial(config_from_dict(base_dict), params, name, report=tune.report, to_tune=True)

    trainable_with_resources = tune.with_resources(trainable, {"cpu": base.tune.cpus_per_trial})
    if restoring:
        get_console().line(f"[wmss] tune: continuing the sweep in {storage.redact(storage.join(root, EXPERIMENT))}"
                           + (" (retrying errored trials)" if retry_errored else ""))
        tuner = tune.Tuner.restore(path, trainable=trainable_with_resources, resume_unfinished=True,
                                   restart_errored=retry_errored, storage_filesystem=tune_fs)
    else:
        save_config(base, storage.join(root, SWEEP_CONFIG))
        tuner = tune.Tuner(
            trainable_with_resources,
            param_space=build_param_space(base.tune.search_space, base.tune.search),
            tune_config=tune.TuneConfig(
                num_samples=base.tune.num_samples, metric=base.tune.metric, mode=base.tune.resolved_mode,
                search_alg=make_search_alg(base), scheduler=make_scheduler(base),
                max_concurrent_trials=max_concurrent,
                trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
            run_config=tune.RunConfig(storage_path=tune_root, storage_filesystem=tune_fs, name=EXPERIMENT,
                                      # a console line per trial; run.trackers: one tracker run per trial
                                      callbacks=[trial_lines_callback(base.tune.metric), *tune_callbacks(base)]),
        )
    grid = tuner.fit()
    finish_sweep(base, grid, root)
    return grid


def finish_sweep(base: WMSSConfig, grid, root: str) -> dict[str, Any] | None:
    """After the trials: the shared SFT-continued control and each trial's paired difference with
    it on validation, results.csv / curves.csv / best.yaml, then the best configuration once on
    ``data.eval`` (final.json), and the sweep page (``<run>/tune/page/index.html``). Returns the
    final held-out result (None when there is none)."""
    from wmss_ray.sweep.control import add_paired, base_outputs, final_heldout
    from wmss_ray.sweep.page import write_sweep_page
    from wmss_ray.sweep.results import curve_rows, trial_rows, write_outputs

    rows, outputs = trial_rows(grid), base_outputs(base)
    add_paired(base, outputs, rows, root)
    best = write_outputs(base, rows, curve_rows(grid), root)
    final = final_heldout(base, outputs, best, root) if best is not None else None
    page = write_sweep_page(root, metric=base.tune.metric, mode=base.tune.resolved_mode)
    get_console().line(f"[wmss] tune: sweep page {storage.redact(page)}")
    return final


def summarize(cfg: WMSSConfig) -> str:
    """The sweep's table from ``<run>/tune/results.csv`` (best first by ``tune.metric``, completed
    trials first; the paired difference with SFT-continued on validation), then the best
    configuration's held-out test result (final.json) last."""
    from wmss_ray.config.names import SFT_CONTINUED_LABEL
    from wmss_ray.sweep.control import final_lines, read_final
    from wmss_ray.sweep.page import rank_rows, read_results
    from wmss_ray.sweep.page_plots import finite

    root = sweep_root(cfg)
    metric, mode = cfg.tune.metric, cfg.tune.resolved_mode
    results = storage.join(root, "results.csv")
    rows = rank_rows(read_results(results)[0], metric, mode) if storage.exists(results) else []

    def num(r: dict[str, Any], k: str, spec: str, scale: float = 1.0) -> str:
        v = r.get(k)
        return format(scale * v, spec) if finite(v) else "-"

    vs_control = f"vs {SFT_CONTINUED_LABEL} [95% CI]"
    lines = [f"trials on the validation split, by {metric} ({mode}); data.eval, the test set, is read once "
             "after the choice",
             f"{'status':>9} {'step':>5} {'accuracy':>9} {'± std':>6} {'loss':>8} {vs_control:>26}  params"]
    for r in rows:
        p = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()
                      if v is not None)
        diff = (f"{num(r, 'diff_vs_sft', '+.1f', 100)} [{num(r, 'diff_ci_low', '+.1f', 100)}, "
                f"{num(r, 'diff_ci_high', '+.1f', 100)}]") if finite(r.get("diff_vs_sft")) else "-"
        lines.append(f"{r['status']:>9} {num(r, 'step', '.0f'):>5} {num(r, 'validation_accuracy', '.3f'):>9} "
                     f"{num(r, 'accuracy_std', '.3f') if finite(r.get('seeds')) and r['seeds'] > 1 else '-':>6} "
                     f"{num(r, 'validation_loss', '.4f'):>8} {diff:>26}  {p}")
    if not any(r["status"] == "completed" for r in rows):
        lines.append("no trial completed: no best.yaml")
    else:
        lines.append(f"best configuration: {storage.redact(storage.join(root, 'best.yaml'))} "
                     "(differences in accuracy points)")
    return "\n".join(lines + final_lines(read_final(root)))
