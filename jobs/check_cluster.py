"""``ray job submit`` entrypoint: a smoke test of the cluster and its shared storage.

    ray job submit --address http://HEAD:8265 -- python -m jobs.check_cluster \
        --storage /mnt/wmss --out /mnt/wmss/check.json

Thin over ``wmss_ray.cli.check_cluster.main`` (what it checks is documented there).
"""

from wmss_ray.cli.check_cluster import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
