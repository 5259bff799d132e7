"""Where a run's bytes go: ``storage`` (local paths and pyarrow URIs: s3://, gs://, ...),
``files`` (the one reader/writer of each file format: JSON lines, ``metrics.jsonl``, Parquet) and
``manifest`` (each phase's manifest.json, fingerprints, the stale-resume rule)."""
