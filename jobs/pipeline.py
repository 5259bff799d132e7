"""``ray job submit`` entrypoint: the whole WMSS pipeline, resumable.

    python -m jobs.pipeline --config configs/demo.yaml [--set run.storage=/mnt/wmss/runs]
                            [--from-phase PHASE]

Thin over ``wmss_ray.pipeline.run_pipeline(cfg, from_phase=...)``; see ``jobs/common.py``.
"""

from __future__ import annotations

import argparse

from jobs import common


def build_parser() -> argparse.ArgumentParser:
    parser = common.build_parser(
        prog="python -m jobs.pipeline",
        description="Run the WMSS pipeline (all phases, resumable) on the Ray cluster this job runs in.",
    )
    parser.add_argument(
        "--from-phase",
        default=None,
        metavar="PHASE",
        help="re-run from this phase on, even if later phases completed before",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        cfg = common.load_job_config(args.config, args.overrides)
        common.connect(args.address)
        from wmss_ray.pipeline import run_pipeline

        common.print_result(run_pipeline(cfg, from_phase=args.from_phase))

    return common.run(body)


if __name__ == "__main__":
    raise SystemExit(main())
