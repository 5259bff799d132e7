"""``ray job submit`` entrypoint: the whole WMSS pipeline, resumable.

    python -m jobs.pipeline --config configs/demo.yaml [--set run.storage=/mnt/wmss/runs]
                            [--from-phase PHASE]

Thin over ``wmss_ray.cli.jobs.pipeline_main`` (``wmss_ray.pipeline.run_pipeline``).
"""

from wmss_ray.cli.jobs import pipeline_main as main
from wmss_ray.cli.jobs import pipeline_parser as build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
