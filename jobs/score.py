"""``ray job submit`` entrypoint: the 'score' phase only.

Entropy scoring of every sample under the weak and the strong model).

    python -m jobs.score --config PATH [--set key=value ...]

Thin over ``wmss_ray.pipeline.run_phase(cfg, "score")``; see ``wmss_ray/cli/jobs.py``.
"""

from __future__ import annotations

from wmss_ray.cli.jobs import phase_entrypoint

build_parser, main = phase_entrypoint("score")

if __name__ == "__main__":
    raise SystemExit(main())
