"""``ray job submit`` entrypoint: a Ray Tune sweep over mix.* / curriculum.* (``tune.search_space``).

    python -m jobs.tune --config PATH [--set tune.num_samples=8 ...]

Thin over ``tune.sweep.run_sweep(cfg)``: the shared phases (up to scoring) run once, then one
trial per sampled setting (curriculum -> WMSS -> eval of the WMSS model); see ``jobs/common.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs import common


def build_parser() -> argparse.ArgumentParser:
    return common.build_parser(
        prog="python -m jobs.tune",
        description="Run a Ray Tune sweep of the WMSS knobs on the Ray cluster this job runs in.",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        cfg = common.load_job_config(args.config, args.overrides)
        common.connect(args.address)
        from tune.baseline import read_final
        from tune.page import read_results
        from tune.results import best_row
        from tune.sweep import run_sweep, summarize

        run_sweep(cfg)
        print(summarize(cfg), flush=True)
        # the best *completed* trial (a stopped one's last report is on a subsample); best.yaml has it
        root = Path(cfg.run_dir()).resolve() / "tune"
        best = best_row(read_results(root / "results.csv")[0], cfg.tune.metric, cfg.tune.resolved_mode) or {}
        common.print_result({"best_config": best.get("params"), "best_metrics": {k: best.get(k) for k in
                             ("validation_accuracy", "validation_loss", "n_validation", "step", "seeds",
                              "accuracy_std", "diff_vs_sft", "diff_ci_low", "diff_ci_high")},
                             "best_trial": best.get("trial"), "heldout_test": read_final(root)})

    return common.run(body)


if __name__ == "__main__":
    raise SystemExit(main())
