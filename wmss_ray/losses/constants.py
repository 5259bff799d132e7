"""Constants every layer shares; defined once here, at the bottom (``core`` imports only torch).

``IGNORE_INDEX``: the label of a position that is not supervised (prompt, template, padding),
PyTorch's ``cross_entropy`` default. ``LOW_PRECISION_DTYPES``: the 16-bit float dtypes whose
inputs the ``core`` kernels upcast to fp32 before any log-softmax / entropy arithmetic.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
