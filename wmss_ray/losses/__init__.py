"""The math of the loss, pure torch/numpy: no Ray, no DeepSpeed, no I/O (tests/test_imports.py).

- ``mixing``: the chunked mixed-logit CE, one loop and one gradient Function for every weak side
  (``chunked_mixed_ce``: hidden states, colocated; ``sparse_mixed_ce``: the pool's log-probs).
- ``weak_side``: the two weak sides per chunk, ``WeakLogProbs`` and the top-k truncation bound.
- ``stats``: ``LossStats``, the loss's named statistics (and their packing for all-reduce).
- ``reference``: the naive ``[N, V]`` references. ``chunk_ops``: the in-place chunk kernels.
- ``positions``: ``answer_positions``, the batch positions the loss scores.
- ``entropy``: answer-token entropy. ``constants``: ``IGNORE_INDEX``. ``diagnostics``: naive
  references of the logged statistics.
"""
