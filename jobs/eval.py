"""``ray job submit`` entrypoint: the 'eval' phase only.

Evaluation of the exported strong model (and the SFT baseline)).

    python -m jobs.eval --config PATH [--set key=value ...]

Thin over ``wmss_ray.pipeline.run_phase(cfg, "eval")``; see ``wmss_ray/cli/jobs.py``.
"""

from __future__ import annotations

from wmss_ray.cli.jobs import phase_entrypoint

build_parser, main = phase_entrypoint("eval")

if __name__ == "__main__":
    raise SystemExit(main())
