"""``wmss study``: WMSS next to its control arms over independent training seeds (docs/CONTROLS.md).

- ``arms.py``: which runs and phases make each arm, the seed and fake-weak configs, the checks
  that fail at once (plain code, no Ray);
- ``runner.py``: the seeds as Ray tasks, each seed's runs through the pipeline's one runner, the
  study's evaluation of the fake-weak arms and the peaks;
- ``table.py``: the per-arm table (seeds, paired differences to WMSS, calibration, costs) from
  what the runs wrote;
- ``page.py``: ``<run>/study/index.html`` with the forest plot and the reliability diagrams.
"""
