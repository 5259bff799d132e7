"""Where a run's bytes go: ``storage`` (local paths and pyarrow URIs: s3://, gs://, ...) and
``manifest`` (each phase's manifest.json, fingerprints, the stale-resume rule)."""
