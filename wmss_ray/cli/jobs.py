"""The ``ray job submit`` entrypoints: argument parsing, cluster connection, and each job's body.

The files in the repository's ``jobs/`` folder are thin: ``jobs/pipeline.py`` runs
:func:`pipeline_main`, ``jobs/tune.py`` :func:`tune_main`, ``jobs/score.py`` / ``train.py`` /
``eval.py`` :func:`phase_entrypoint`, ``jobs/check_cluster.py`` ``cli.check_cluster.main``.

Every entrypoint in ``jobs/`` is ``python -m jobs.<name> --config PATH [--set key=value ...]``
and runs *inside* an existing Ray cluster: it connects through the package's one Ray start-up,
``wmss_ray.cluster.ensure_ray(address="auto")`` (``ray job submit`` points it at the cluster
through ``RAY_ADDRESS``), and never starts a cluster of its own. Heavy imports (Ray, the wmss_ray API) happen inside ``main`` so ``--help`` and
``build_parser()`` work without them.

``--config`` takes a path (relative to the job's working directory: the uploaded ``working_dir``,
or the image's ``/app`` on Kubernetes) or ``env:NAME``, the YAML text itself in the environment
variable ``NAME`` (``wmss submit`` uses this when the config file is not inside the uploaded
working_dir).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Callable

EXIT_OK = 0
EXIT_USAGE = 2  # bad config / arguments / no cluster to connect to

INLINE_PREFIX = "env:"


class JobSetupError(RuntimeError):
    """The job could not start: bad config, or no reachable Ray cluster. Exit code 2."""


def build_parser(prog: str, description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """The arguments every entrypoint shares: ``--config`` and repeated ``--set key=value``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        required=config_required,
        metavar="PATH",
        help="YAML config (path in the job's working directory, or env:VAR holding the YAML text)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override applied after the YAML, e.g. --set mix.lam=0.45 (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="the libraries' output (Ray, DeepSpeed, transformers) in the job log too, "
                             "not only in <run>/logs/")
    parser.add_argument(
        "--address",
        default="auto",
        help="Ray address to connect to (default: auto, i.e. the cluster `ray job submit` runs in)",
    )
    return parser


def load_job_config(config: str, overrides: list[str] | None) -> Any:
    """Load the config through ``wmss_ray.config.loading.load_config``; ``env:NAME`` reads inline YAML."""
    from wmss_ray.config.loading import load_config
    from wmss_ray.config.schema import ConfigError

    try:
        if config.startswith(INLINE_PREFIX):
            name = config[len(INLINE_PREFIX):]
            text = os.environ.get(name)
            if text is None:
                raise JobSetupError(f"--config {config}: environment variable {name} is not set")
            with tempfile.TemporaryDirectory(prefix="wmss-cfg-") as tmp:
                path = os.path.join(tmp, "config.yaml")
                with open(path, "w") as f:
                    f.write(text)
                return load_config(path, overrides)
        return load_config(config, overrides)
    except ConfigError as err:
        raise JobSetupError(str(err)) from None


def connect(address: str = "auto") -> None:
    """Connect to the running cluster; never start one. Clear error when none is reachable."""
    from wmss_ray.cluster import TOKEN_HELP, AuthTokenError, ensure_ray

    try:
        ensure_ray(address=address)  # the package's one ray.init: join only, with its runtime env policy
    except AuthTokenError as err:
        raise JobSetupError(str(err)) from None
    except ConnectionError as err:
        raise JobSetupError(
            f"no running Ray cluster reachable at address={address!r} ({err}). "
            "The jobs/ entrypoints run inside a cluster: submit them with `wmss submit` or "
            "`ray job submit`, or start one first with `ray start --head`. For a local "
            "single-process run use `wmss run` instead."
        ) from None
    except Exception as err:  # ray.exceptions.AuthenticationError and friends
        if type(err).__name__ == "AuthenticationError":
            raise JobSetupError(
                f"the Ray cluster refused the connection: its auth token is missing or wrong; {TOKEN_HELP}"
            ) from None
        raise


def print_result(result: Any) -> None:
    """Print what the API returned as one JSON line (for the job logs); never fails."""
    try:
        if hasattr(result, "model_dump"):
            result = result.model_dump(mode="json")
        text = json.dumps(result, default=str, sort_keys=True)
    except Exception:
        text = repr(result)
    from wmss_ray.io.console import get_console

    get_console().line(f"wmss-job-result: {text}")


def run(body: Callable[[], None]) -> int:
    """Run ``body``; setup errors and what the user got wrong (``wmss_ray.io.errors.UserError``
    anywhere in the chain: a missing corpus, an unreachable store) become exit code 2 with a
    one-line message.

    Any other exception propagates: Python prints the traceback and exits 1, which Ray reports
    as a FAILED job with the traceback in its logs.
    """
    from wmss_ray.io.errors import find_user_error, user_error_text

    try:
        body()
    except JobSetupError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except BaseException as err:  # noqa: BLE001 - re-raised unless it is the user's to fix
        found = find_user_error(err)
        if found is None:
            raise
        print(f"error: {user_error_text(found)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return EXIT_OK


PHASES = ("score", "train", "eval")


def phase_entrypoint(phase: str) -> tuple[Callable[[], argparse.ArgumentParser], Callable[..., int]]:
    """``(build_parser, main)`` for a single-phase entrypoint: ``wmss_ray.pipeline.run_phase``."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")

    def _build_parser() -> argparse.ArgumentParser:
        return build_parser(
            prog=f"python -m jobs.{phase}",
            description=f"Run the WMSS '{phase}' phase on the Ray cluster this job runs in.",
        )

    def _main(argv: list[str] | None = None) -> int:
        args = _build_parser().parse_args(argv)

        def body() -> None:
            cfg = load_job_config(args.config, args.overrides)
            from wmss_ray.cli.output import run_console
            from wmss_ray.pipeline import preflight

            preflight(cfg)  # before the run's logs/ exists

            with run_console(cfg, args.verbose):  # library output to <run>/logs/: `ray job logs` reads like a log of the run
                connect(args.address)
                from wmss_ray.cli.output import tracked
                from wmss_ray.pipeline import run_phase

                with tracked(cfg):
                    result = run_phase(cfg, phase)
                print_result(result)

        return run(body)

    _build_parser.__name__ = "build_parser"
    _main.__name__ = "main"
    return _build_parser, _main


def pipeline_parser() -> argparse.ArgumentParser:
    parser = build_parser(
        prog="python -m jobs.pipeline",
        description="Run the WMSS pipeline (all phases, resumable) on the Ray cluster this job runs in.",
    )
    parser.add_argument("--from-phase", default=None, metavar="PHASE",
                        help="re-run from this phase on, even if later phases completed before")
    return parser


def pipeline_main(argv: list[str] | None = None) -> int:
    """``python -m jobs.pipeline``: ``wmss_ray.pipeline.run_pipeline(cfg, from_phase=...)``."""
    args = pipeline_parser().parse_args(argv)

    def body() -> None:
        cfg = load_job_config(args.config, args.overrides)
        from wmss_ray.cli.output import run_console
        from wmss_ray.pipeline import preflight

        preflight(cfg)  # before the run's logs/ exists

        with run_console(cfg, args.verbose):  # library output to <run>/logs/: `ray job logs` reads like a log of the run
            connect(args.address)
            from wmss_ray.cli.output import tracked
            from wmss_ray.pipeline import run_pipeline

            with tracked(cfg):
                result = run_pipeline(cfg, from_phase=args.from_phase)
            print_result(result)

    return run(body)


def tune_parser() -> argparse.ArgumentParser:
    return build_parser(prog="python -m jobs.tune",
                        description="Run a Ray Tune sweep of the WMSS knobs on the Ray cluster this job runs in.")


def tune_main(argv: list[str] | None = None) -> int:
    """``python -m jobs.tune``: ``wmss_ray.sweep.driver.run_sweep(cfg)``, then the best completed
    trial and the held-out result as the job's result line."""
    args = tune_parser().parse_args(argv)

    def body() -> None:
        cfg = load_job_config(args.config, args.overrides)
        from wmss_ray.cli.output import run_console
        from wmss_ray.pipeline import preflight

        preflight(cfg)  # before the run's logs/ exists

        with run_console(cfg, args.verbose):
            connect(args.address)
            from wmss_ray.io import storage
            from wmss_ray.sweep.control import read_final
            from wmss_ray.sweep.driver import run_sweep, summarize
            from wmss_ray.sweep.page import read_results
            from wmss_ray.sweep.results import best_row
            from wmss_ray.sweep.trial import sweep_root

            run_sweep(cfg)
            from wmss_ray.io.console import get_console

            get_console().line(summarize(cfg))
            # the best *completed* trial (a stopped one's last report is on a subsample); best.yaml has it
            root = sweep_root(cfg)
            best = best_row(read_results(storage.join(root, "results.csv"))[0], cfg.tune.metric,
                            cfg.tune.resolved_mode) or {}
            print_result({"best_config": best.get("params"), "best_metrics": {k: best.get(k) for k in
                          ("validation_accuracy", "validation_loss", "n_validation", "step", "seeds",
                           "accuracy_std", "diff_vs_sft", "diff_ci_low", "diff_ci_high")},
                          "best_trial": best.get("trial"), "heldout_test": read_final(root)})

    return run(body)
