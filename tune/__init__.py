"""Sweep entry points run from the repository root (``python -m tune.page``); not an installed
package. The sweep itself is ``wmss_ray.sweep`` (``wmss tune CONFIG``, ``python -m jobs.tune``)."""
