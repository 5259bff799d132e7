"""The frozen weak model served apart from the Train workers (``mix.placement: pool``).

``wire`` (request/reply arrays), ``slices`` (a request split over a replica's shards, the replies
merged) and ``server`` (:class:`~.server.WeakServer`) are plain code;
``group`` (the Ray actor group and :class:`~.group.PoolClient`) and ``feed`` (a Train worker's
prefetching reply stream) are the Ray edge. docs/TRAINING.md "Where the weak model lives".
"""
