"""A Ray Train callback that records what its process (the run's controller) has imported.

Kept apart from the test modules on purpose: the controller unpickles a callback by reference,
importing its module, so this module imports only the standard library and Ray.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ray.train.v2.api.callback import UserCallback

#: Libraries only the train workers need (models, engines, tensors): the controller holds
#: ``training/backend.py``'s ``RankGroupConfig``, not Ray's ``TorchConfig`` (which imports torch).
HEAVY = ("torch", "transformers", "deepspeed")


class ControllerImports(UserCallback):
    """After each report, writes ``{"heavy": [...]}`` (the ``HEAVY`` modules loaded in the
    controller process) to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        Path(self.path).write_text(json.dumps({"heavy": [m for m in HEAVY if m in sys.modules]}))
