"""``ray job submit`` entrypoint: a Ray Tune sweep over mix.* / curriculum.* (``tune.search_space``).

    python -m jobs.tune --config PATH [--set tune.num_samples=8 ...]

Thin over ``wmss_ray.cli.jobs.tune_main`` (``wmss_ray.sweep.driver.run_sweep``): the shared
phases (up to scoring) run once, then one trial per sampled setting.
"""

from wmss_ray.cli.jobs import tune_main as main
from wmss_ray.cli.jobs import tune_parser as build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
