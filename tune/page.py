"""Redraw a sweep's page: ``python -m tune.page <run>/tune [--metric M --mode max|min]``.

Thin over ``wmss_ray.sweep.page.main`` (the sweep's logic lives in ``wmss_ray/sweep/``; this
folder is not an installed package: run it from the repository root, or use
``python -m wmss_ray.sweep.page`` anywhere the package is installed).
"""

from wmss_ray.sweep.page import main

if __name__ == "__main__":
    main()
