"""``ray job submit`` entrypoint: the 'train' phase only.

WMSS joint training (mixed-logit loss, curriculum sampling)).

    python -m jobs.train --config PATH [--set key=value ...]

Thin over ``wmss_ray.pipeline.run_phase(cfg, "train")``; see ``wmss_ray/cli/jobs.py``.
"""

from __future__ import annotations

from wmss_ray.cli.jobs import phase_entrypoint

build_parser, main = phase_entrypoint("train")

if __name__ == "__main__":
    raise SystemExit(main())
