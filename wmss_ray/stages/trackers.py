"""Experiment trackers: ``run.trackers: [tensorboard, mlflow, wandb]`` (default ``[tensorboard]``).

TensorBoard is what the training ranks write anyway (``<phase>/tb/``). MLflow and Weights &
Biases get one tracker run per ``wmss run`` / ``jobs.pipeline`` (named ``run.name``), filled
from what the run directory holds when the command ends (also after a failure, with what
completed): the run's config as parameters (dotted keys), every logged training metric per
step (``<phase>/<metric>``, step = the phase's optimizer step), the phase timings
(``time/<phase>_s``), the evaluation results (``eval/<model>/accuracy|loss``) and the
report, ``eval_results.json`` and ``summary.json`` as artifacts. Reading the run directory
instead of hooking the training ranks keeps the trackers out of the Ray workers: their only
credentials are the driver's.

Credentials and destinations come from the environment only, never the config:
MLflow: ``MLFLOW_TRACKING_URI`` (a file store ``file:///...``, or a server; its token in
``MLFLOW_TRACKING_TOKEN`` / ``MLFLOW_TRACKING_USERNAME`` + ``_PASSWORD``), experiment
``MLFLOW_EXPERIMENT_NAME`` (default ``wmss``). W&B: ``WANDB_API_KEY``, ``WANDB_MODE``
(``online`` | ``offline``), ``WANDB_PROJECT`` (default ``wmss``), ``WANDB_ENTITY``, ``WANDB_DIR``
(default ``<run>/logs``).

In a sweep (``wmss tune``) each trial is one tracker run through Ray Tune's own
``MLflowLoggerCallback`` / ``WandbLoggerCallback`` (:func:`tune_callbacks`), grouped under the
sweep: MLflow experiment ``<run.name>-sweep`` (or ``MLFLOW_EXPERIMENT_NAME``), W&B group ``run.name``.

Layer: ``stages`` (``config``, ``io``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from wmss_ray.config.schema import WMSSConfig
from wmss_ray.io import storage
from wmss_ray.io.files import read_metrics
from wmss_ray.io.manifest import read_manifest

log = logging.getLogger("wmss_ray.stages.trackers")

DEFAULT_PROJECT = "wmss"


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"mix.lam": "0.5", ...}``: a nested config as dotted keys with string values."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_records(run_dir: str, phases: list[str]) -> dict[str, Any]:
    """What the trackers log, read from ``run_dir``: ``{"steps": {phase: [{metric: value}, ...]},
    "summary": {key: number}, "artifacts": [local paths]}`` (completed phases only)."""
    steps: dict[str, list[dict[str, float]]] = {}
    summary: dict[str, float] = {}
    for name in phases:
        man = read_manifest(storage.join(run_dir, name))
        if man is None or man.status != "completed":
            continue
        if _number(man.total_seconds):
            summary[f"time/{name}_s"] = float(man.total_seconds)
        metrics = (man.outputs or {}).get("metrics")
        if metrics and storage.exists(str(metrics)):
            steps[name] = [{k: float(v) for k, v in row.items() if _number(v)} for row in read_metrics(str(metrics))]
        for model, r in ((man.outputs or {}).get("models") or {}).items() if name == "eval" else ():
            for key in ("accuracy", "loss"):
                if _number(r.get(key)):
                    summary[f"eval/{model}/{key}"] = float(r[key])
    artifacts = [p for p in (storage.join(run_dir, "eval", "eval_results.json"),
                             storage.join(run_dir, "report", "report.html"), storage.join(run_dir, "summary.json"))
                 if not storage.is_uri(p) and os.path.exists(p)]
    return {"steps": steps, "summary": summary, "artifacts": artifacts}


def log_to_mlflow(cfg: WMSSConfig, records: dict[str, Any], status: str = "FINISHED") -> str:
    """One MLflow run named ``run.name`` at ``MLFLOW_TRACKING_URI``; returns its run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # tracking URI and credentials from the environment
    exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)
    run = client.create_run(exp_id, run_name=cfg.run.name, tags={"wmss.config_hash": cfg.config_hash()})
    rid, now = run.info.run_id, int(time.time() * 1000)
    params = [Param(k, v[:6000]) for k, v in flat_params(cfg.to_dict()).items()]
    metrics = [Metric(f"{phase}/{k}", v, now, int(row.get("step", i + 1)))
               for phase, rows in records["steps"].items() for i, row in enumerate(rows) for k, v in row.items()
               if k != "step"]
    metrics += [Metric(k, v, now, 0) for k, v in records["summary"].items()]
    for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(rid, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    for path in records["artifacts"]:
        client.log_artifact(rid, path)
    client.set_terminated(rid, status)
    return rid


def log_to_wandb(cfg: WMSSConfig, records: dict[str, Any], run_dir: str, failed: bool = False) -> str:
    """One W&B run named ``run.name`` (online or ``WANDB_MODE=offline``); returns its id. Each
    phase's metrics are plotted against its own step (``define_metric``: W&B's own step must grow)."""
    import wandb

    local = None if storage.is_uri(run_dir) else os.path.join(run_dir, "logs")
    if local:
        os.makedirs(local, exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=cfg.run.name,
                     config=cfg.to_dict(), dir=os.environ.get("WANDB_DIR", local), reinit="create_new")
    try:
        for phase, rows in records["steps"].items():
            run.define_metric(f"{phase}/step")
            run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            for i, row in enumerate(rows):
                run.log({f"{phase}/step": row.get("step", i + 1),
                         **{f"{phase}/{k}": v for k, v in row.items() if k != "step"}})
        run.summary.update(records["summary"])
        for path in records["artifacts"]:
            art = wandb.Artifact(f"{cfg.run.name}-{os.path.basename(path).replace('.', '-')}", type="result")
            art.add_file(path)
            run.log_artifact(art)
        return run.id
    finally:
        run.finish(exit_code=1 if failed else 0)


def log_run(cfg: WMSSConfig, phases: list[str], failed: bool = False) -> dict[str, str]:
    """Send a finished (or failed) run to every tracker of ``run.trackers`` besides TensorBoard;
    returns ``{tracker: run id}``. A tracker that fails is a warning, never the run's failure."""
    wanted = [t for t in cfg.run.trackers if t != "tensorboard"]
    if not wanted:
        return {}
    run_dir = storage.location(cfg.run_dir())
    records = run_records(run_dir, phases)
    ids: dict[str, str] = {}
    for name in wanted:
        try:
            if name == "mlflow":
                ids[name] = log_to_mlflow(cfg, records, "FAILED" if failed else "FINISHED")
            elif name == "wandb":
                ids[name] = log_to_wandb(cfg, records, run_dir, failed)
        except Exception as err:  # noqa: BLE001 - the run's results are safe in its directory
            log.warning("tracker %s: could not log the run (%s: %s); its results are in %s",
                        name, type(err).__name__, err, storage.redact(run_dir))
    return ids


def tune_callbacks(cfg: WMSSConfig) -> list[Any]:
    """Ray Tune logger callbacks for ``run.trackers``: one tracker run per trial, grouped under
    the sweep (see the module doc)."""
    out: list[Any] = []
    if "mlflow" in cfg.run.trackers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", f"{cfg.run.name}-sweep"),
            tags={"wmss.sweep": cfg.run.name}, save_artifact=False))
    if "wandb" in cfg.run.trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                                       group=cfg.run.name, log_config=True))
    return out
