"""One module per stage a user knows, in pipeline order: ``pretrain`` (phase 0, demo only),
``tokenize`` (Ray Data), ``scorer`` + ``score`` (entropy scoring), ``curriculum``, ``evaluate``
(with ``checkers`` and ``stats``), ``report`` (with ``report_plots``, ``report_storage``).
Training (SFT and WMSS) is ``wmss_ray.training``; ``wmss_ray.pipeline`` runs them in order."""
