"""Ray Tune sweeps of the WMSS knobs (``wmss tune``): ``driver`` (run_sweep, search, ASHA),
``trial`` (one trial's run dirs and reports), ``reports`` (in-run reports to Tune), ``results``
(results.csv, curves.csv, best.yaml), ``control`` (the shared SFT-continued control and the
held-out test), ``page`` + ``page_plots`` (the sweep page)."""
