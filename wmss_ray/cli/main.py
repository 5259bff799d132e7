"""The ``wmss`` command.

    wmss demo                         the embedded default: demo world, local Ray, tiny models
    wmss run CONFIG [--set k=v ...]   the whole pipeline (skips completed phases)
    wmss score|train|eval|report CONFIG   the pipeline up to that phase
    wmss tune CONFIG                  Ray Tune sweep over lambda, alpha, beta, gamma
    wmss study CONFIG [--seeds N]     WMSS and its control arms over N training seeds (docs/CONTROLS.md)
    wmss validate CONFIG              load and validate a config, print it resolved
    wmss plan CONFIG [--gpu-memory 80GiB]   GPU memory per rank the config needs, and what to change
    wmss submit|status|logs ...       Ray job submission to a running cluster (token auth)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from wmss_ray.cli.output import run_console, tracked
from wmss_ray.cli.submit import add_cli_commands
from wmss_ray.config.loading import load_config
from wmss_ray.config.schema import ConfigError
from wmss_ray.io import storage
from wmss_ray.io.errors import EXIT_USER_ERROR, find_user_error, user_error_text


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set mix.lam=0.45 (repeatable)")
    # also after the subcommand (`wmss demo --verbose`); SUPPRESS keeps `wmss --verbose demo`'s value
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show the libraries' output and tracebacks on the console (else in <run>/logs/)")


def _demo_config_path() -> Path | None:
    here = Path.cwd() / "configs" / "demo.yaml"
    return here if here.exists() else None


def _print_results(outputs: dict, console) -> None:
    from wmss_ray.stages.report import format_results_table

    models = outputs.get("eval", {}).get("models")
    if models:
        console.line(format_results_table({"models": models}))
    report = outputs.get("report", {}).get("report")
    if report:
        console.line(f"report: {report}")


def _cmd_run(args: argparse.Namespace, demo: bool = False) -> int:
    from wmss_ray.pipeline import preflight, run_pipeline

    path = _demo_config_path() if demo else args.config
    cfg = load_config(path, args.overrides)
    preflight(cfg)  # a missing model, tokenizer or corpus: one line, before a run dir or log exists
    source = str(path or "<embedded demo default>")
    with run_console(cfg, getattr(args, "verbose", False), source) as console:
        with tracked(cfg):
            outputs = run_pipeline(cfg, from_phase=getattr(args, "from_phase", None))
        _print_results(outputs, console)
        _print_timings(cfg.run_dir(), console)
    return 0


def _print_timings(run_dir: str, console) -> None:
    """The final table's timing part, from ``<run>/summary.json`` (``stages/timings.py``)."""
    from wmss_ray.stages.timings import format_timings_table, read_summary

    summary = read_summary(storage.location(run_dir))
    if summary and summary.get("timings"):
        console.line(format_timings_table(summary["timings"]))


def _cmd_phase(args: argparse.Namespace) -> int:
    from wmss_ray.pipeline import preflight, run_phase

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    with run_console(cfg, getattr(args, "verbose", False)) as console:
        with tracked(cfg):
            outputs = run_phase(cfg, args.command, force=args.force)
        if args.command in ("eval", "report"):
            _print_results(outputs, console)
        else:
            last = list(outputs)[-1] if outputs else None
            console.line(json.dumps({last: outputs.get(last)}, indent=2, default=str))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from wmss_ray.pipeline import preflight
    from wmss_ray.sweep.driver import run_sweep, summarize

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    with run_console(cfg, getattr(args, "verbose", False)) as console:
        run_sweep(cfg, retry_errored=args.retry_errored)
        console.line(summarize(cfg))  # the table, then the best configuration's held-out result, last
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from wmss_ray.pipeline import preflight
    from wmss_ray.study.runner import run_study
    from wmss_ray.study.table import summary_text

    overrides = list(args.overrides) + ([f"study.seeds={args.seeds}"] if args.seeds else [])
    cfg = load_config(args.config, overrides)
    preflight(cfg)
    with run_console(cfg, getattr(args, "verbose", False), str(args.config)) as console:
        console.line(summary_text(run_study(cfg)))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"# valid; config hash {cfg.config_hash()}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from wmss_ray.plan import format_plan, parse_memory

    cfg = load_config(args.config, args.overrides)
    try:
        budget = parse_memory(args.gpu_memory) if args.gpu_memory else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(format_plan(cfg, budget, source=args.config, gpus_per_node=args.gpus_per_node))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmss", description="WMSS on Ray: weak agents make strong agents stronger")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything on the console: debug logging and the output of Ray, DeepSpeed and "
                             "transformers (else in <run>/logs/), and the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the embedded demo (configs/demo.yaml)")
    _add_config_args(p, config_required=False)
    p.add_argument("--from", dest="from_phase", help="rerun from this phase on")
    p.set_defaults(func=lambda a: _cmd_run(a, demo=True))

    p = sub.add_parser("run", help="run the whole pipeline")
    _add_config_args(p)
    p.add_argument("--from", dest="from_phase", help="rerun from this phase on")
    p.set_defaults(func=_cmd_run)

    for name, text in [("score", "tokenise and score the corpus (weak and strong entropies, curriculum)"),
                       ("train", "run through WMSS training"), ("eval", "run through evaluation"),
                       ("report", "run through the report")]:
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="rerun this phase even if completed")
        p.set_defaults(func=_cmd_phase)

    p = sub.add_parser("tune", help="Ray Tune sweep over mix.* / curriculum.* (tune.search_space)")
    _add_config_args(p)
    p.add_argument("--retry-errored", action="store_true", help="continuing a sweep: run errored trials again")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("study", help="WMSS and its control arms over independent training seeds (study.*)")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="training seeds (default: study.seeds)")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("validate", help="validate a config and print it resolved")
    _add_config_args(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="GPU memory per rank the config needs (no model weights are loaded)")
    _add_config_args(p)
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory of one GPU, e.g. 80GiB, 141GB")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="N",
                   help="GPUs of one node, for the local-disk figure per node (default 8)")
    p.set_defaults(func=_cmd_plan)

    add_cli_commands(sub)  # submit / status / logs: an import failure there must surface, not hide them
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand. What the user got wrong (a :class:`UserError` anywhere in the
    exception's chain: config, corpus, model directory, storage, Ray address) is one or two lines
    on stderr and exit status 2, with the traceback only under ``--verbose``; any other exception
    is a bug and propagates with its traceback."""
    try:
        return int(args.func(args) or 0)
    except BaseException as err:  # noqa: BLE001 - re-raised unless it is the user's to fix
        found = find_user_error(err)
        if found is None:
            raise
        if getattr(args, "verbose", False):
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        print(f"wmss: {user_error_text(found)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
