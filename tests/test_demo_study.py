"""benchmarks/demo_study.py (the README's result): its variants are valid configs and its
write-up reports what the per-problem outcomes say. The training it drives is tested elsewhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from wmss_ray.config.loading import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("demo_study", REPO / "benchmarks" / "demo_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.mark.parametrize("name", list(study.VARIANTS))
def test_every_variant_is_a_valid_config_that_changes_only_the_wmss_side(name, tmp_path):
    overrides, weak = study.VARIANTS[name]
    base = study.seed_config(str(study.DEMO_CONFIG), tmp_path, 0)
    cfg = config_from_dict(base.to_dict(), overrides + (["models.weak=/m"] if weak else []))
    changed = {k for k in base.to_dict() if cfg.to_dict()[k] != base.to_dict()[k]}
    assert changed <= {"mix", "curriculum", "models"}
    assert cfg.training == base.training and cfg.data == base.data  # same steps, same corpus


def _evals(acc: dict[str, list[bool]]) -> dict:
    return {m: {"accuracy": sum(v) / len(v), "loss": 0.1, "n": len(v),
                "correct": {f"eval-{i}": c for i, c in enumerate(v)}} for m, v in acc.items()}


def _seed(seed: int, wmss: list[bool], sft: list[bool]) -> dict:
    evals = _evals({"M0": [False] * len(sft), "M1": [False] * len(sft), "SFT-continued": sft, "WMSS": wmss})
    return {"seed": seed, "evals": evals, "phase_seconds": {"sft": 10.0, "wmss_1": 20.0},
            "demo_eval": {m: {"accuracy": e["accuracy"], "loss": 0.1, "n": 3} for m, e in evals.items()},
            "wmss_vs_sft": study.paired(evals["WMSS"], evals["SFT-continued"], "WMSS", "SFT-continued").to_dict()}


def test_the_write_up_pools_seeds_per_problem_and_lists_ablations():
    # seed 0: WMSS wins 3 problems SFT-continued loses; seed 1: loses 1; 10 problems each
    s0 = _seed(0, [True] * 8 + [False] * 2, [True] * 5 + [False] * 5)
    s1 = _seed(1, [True] * 4 + [False] * 6, [True] * 5 + [False] * 5)
    variant_eval = _evals({"v": [True] * 10})["v"]
    abl = [{"name": "lambda 0.3", "seed": s["seed"], "weak_model": "M0", "eval": variant_eval,
            "vs_sft": study.paired(variant_eval, s["evals"]["SFT-continued"], "v", "SFT-continued").to_dict(),
            "vs_wmss": study.paired(variant_eval, s["evals"]["WMSS"], "v", "WMSS").to_dict()} for s in (s0, s1)]
    text = study.write_up([s0, s1], abl, 10, "python benchmarks/demo_study.py", saturated=None)
    assert "| 0 | 0.0 % | 0.0 % | 50.0 % | 80.0 % | +30.0 [" in text
    assert "3 vs 0, p=0.25" in text  # exact McNemar: 2 * 0.5**3
    # pooled: 20 problem-runs, WMSS right only 3 (seed 0), SFT-continued right only 1 (seed 1)
    assert "Pooled over 2 seeds (20 problem-runs): WMSS − SFT-continued +10.0 [" in text and "3 vs 1" in text
    assert "| SFT-continued | 50.0 % ± 0.0 [50.0 %, 50.0 %]" in text
    assert "| WMSS | 60.0 % ± 28.3 [40.0 %, 80.0 %]" in text
    assert "| 0 | lambda 0.3 | M0 (0.0 %) | 100.0 % |" in text and "| 1 | lambda 0.3 |" in text
    # a variant run on two seeds gets a pooled line: 10 + 10 problem-runs, SFT-continued right on 5 + 5
    assert "lambda 0.3 over seeds 0, 1: accuracy 100.0 % ± 0.0; pooled (20 problem-runs) − SFT-continued +50.0" in text


def test_the_large_eval_set_extends_the_demo_eval_set_and_never_meets_training(tmp_path):
    from wmss_ray.data.synthetic import generate_split

    cfg = load_config(str(REPO / "configs" / "test-tiny.yaml"), [f"run.storage={tmp_path}"])
    path = study.large_eval_set(cfg, 40)
    rows = [__import__("json").loads(line) for line in Path(path).read_text().splitlines()]
    demo_eval = generate_split("eval", cfg.data.demo.n_eval, cfg.run.seed, cfg.data.demo)
    assert rows[: len(demo_eval)] == demo_eval and len(rows) == 40
    train = {r["messages"][0]["content"] for r in generate_split("train", 200, cfg.run.seed, cfg.data.demo)}
    assert not train & {r["messages"][0]["content"] for r in rows}
