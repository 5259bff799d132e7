"""The math of the loss, pure torch/numpy: no Ray, no DeepSpeed, no I/O (tests/test_imports.py).

- ``mixing``: the chunked mixed-logit CE over dense weak logits (colocated weak model).
- ``sparse_mixing``: the same CE with the weak side as log-probs (the weak pool's top-k replies).
- ``chunk_ops``: the in-place chunk kernels both share. ``entropy``: answer-token entropy.
- ``constants``: ``IGNORE_INDEX``. ``diagnostics``: naive references of the logged statistics.
"""
