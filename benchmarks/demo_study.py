"""The demo study behind the README's result: WMSS vs SFT-continued over seeds, and ablations.

Seeds. For each seed the whole demo pipeline runs (``configs/demo.yaml`` with ``run.seed``;
completed phases are reused by fingerprint), then M0, M1, SFT-continued and WMSS are evaluated
on a larger held-out set: the first ``--n-eval`` problems of the demo's eval split (its first
300 are the demo's own eval set; the split never overlaps training). WMSS is tested against
SFT-continued per problem (exact McNemar, paired bootstrap CI) per seed and pooled over seeds.

Ablations. On one seed (``--ablate-seed``) variants of the WMSS phase are trained from the same
M0, M1 and tokenised corpus (those phases are linked from the seed's run, never rerun), each
with the same number of optimizer steps as WMSS and SFT-continued:

- lambda 0.3 / 0.7 / 0.9 (default 0.5), and 1.0: plain SFT on the curriculum's sample, which
  separates what the curriculum does from what mixing does,
- frozen weak model (default joint), and frozen with each fake weak side (uniform,
  entropy-matched, shuffled: docs/CONTROLS.md), which separate the weak model's knowledge from
  the mixing itself,
- uniform sampling instead of the entropy curriculum,
- the weak-strong gap: the weak agent is M0 (default), a half-epoch SFT model, or M1 itself
  (no gap); the corpus is re-scored with that weak model, so the curriculum follows it.

Usage::

    python benchmarks/demo_study.py --storage runs/study --seeds 0 1 2 --ablate-seed 0 \
        --out benchmarks/results_demo_study.md
    # reuse a finished `wmss demo` run for seed 0 instead of training it again:
    python benchmarks/demo_study.py --storage runs/study --link-run 0=runs/wmss-demo ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wmss_ray.config.schema import WMSSConfig  # noqa: E402

from wmss_ray.config.loading import config_from_dict, load_config
from wmss_ray.sweep.driver import link_shared_phases  # noqa: E402
from wmss_ray.stages.stats import PairedTest, mean_and_spread, paired_test_per_sample  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MODELS = ("M0", "M1", "SFT-continued", "WMSS")
# name -> (config overrides, weak agent: None = M0 (default) | "M1" | "half-sft")
VARIANTS: dict[str, tuple[list[str], str | None]] = {
    "lambda 0.3": (["mix.lam=0.3"], None),
    "lambda 0.7": (["mix.lam=0.7"], None),
    "lambda 0.9": (["mix.lam=0.9"], None),
    "lambda 1.0 (curriculum only)": (["mix.lam=1.0"], None),  # = SFT on the curriculum's sample
    "frozen weak": (["mix.mode=frozen"], None),
    # the controls' fake weak sides (docs/CONTROLS.md): compare with "frozen weak"
    "frozen, uniform weak": (["mix.mode=frozen", "mix.weak_source=uniform"], None),
    "frozen, entropy-matched weak": (["mix.mode=frozen", "mix.weak_source=entropy_matched"], None),
    "frozen, shuffled weak": (["mix.mode=frozen", "mix.weak_source=shuffled"], None),
    "uniform sampling": (["curriculum.enabled=false"], None),
    "weak = half-epoch SFT": ([], "half-sft"),
    "weak = M1 (no gap)": ([], "M1"),
}
UPSTREAM = ("data", "phase0", "tokenize", "sft")  # phases every variant shares with its seed's run


def slugify(name: str) -> str:
    """A file- and run-name-safe form of a variant or model name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def seed_config(config: str, storage: Path, seed: int) -> WMSSConfig:
    return load_config(config, [f"run.seed={seed}", f"run.storage={storage}", f"run.name=seed{seed}"])


def large_eval_set(cfg: WMSSConfig, n: int) -> str:
    """Write the first ``n`` eval-split problems of this seed to ``<run_dir>/study/`` once."""
    from wmss_ray.data.synthetic import generate_split

    path = Path(cfg.run_dir()) / "study" / f"eval_{n}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in generate_split("eval", n, cfg.run.seed, cfg.data.demo)))
        tmp.replace(path)
    return str(path)


def evaluate_cached(cfg: WMSSConfig, name: str, model_dir: str, eval_path: str, out_dir: Path) -> dict[str, Any]:
    """Accuracy, loss and per-problem outcomes of one model; reused when model and set match."""
    from wmss_ray.stages.evaluate import evaluate_model

    out_dir.mkdir(parents=True, exist_ok=True)
    slug = slugify(name)
    summary_path = out_dir / f"{slug}.json"
    if summary_path.exists():
        cached = json.loads(summary_path.read_text())
        if cached["model_dir"] == model_dir and cached["eval_path"] == eval_path:
            return cached
    # One process: at a few thousand problems the actor pool's start-up costs more than it saves.
    res = evaluate_model(model_dir, eval_path, cfg, name=slug, out_dir=out_dir, use_ray=False)
    summary = {"name": name, "model_dir": model_dir, "eval_path": eval_path, "n": res.n,
               "accuracy": res.accuracy, "loss": res.loss,
               "correct": {r["sample_id"]: bool(r["correct"]) for r in res.per_sample}}
    summary_path.write_text(json.dumps(summary))
    return summary


def paired(a: dict, b: dict, name_a: str, name_b: str) -> PairedTest:
    rows = lambda m: [{"sample_id": k, "correct": v} for k, v in m["correct"].items()]  # noqa: E731
    return paired_test_per_sample(rows(a), rows(b), name_a=name_a, name_b=name_b)


def run_seed(config: str, storage: Path, seed: int, n_eval: int, link: str | None = None,
             sft_epochs: float | None = None) -> dict[str, Any]:
    """The whole demo for one seed, evaluated on the large held-out set.

    ``sft_epochs``: the saturated-M1 arm: phase 1 runs that many epochs (in its own run dir,
    ``seed<N>-sft<E>ep``, whose data, M0 and tokenised corpus are linked from the seed's run).
    """
    from wmss_ray.pipeline import run_pipeline

    seed_cfg = seed_config(config, storage, seed)
    cfg = seed_cfg
    run_dir = Path(cfg.run_dir())
    if sft_epochs is not None:
        cfg = config_from_dict(seed_cfg.to_dict(), [f"run.name=seed{seed}-sft{sft_epochs:g}ep",
                                                    f"training.sft_epochs={sft_epochs}"])
        run_dir = Path(cfg.run_dir())
        link_shared_phases(Path(seed_cfg.run_dir()).resolve(), run_dir, ("data", "phase0", "tokenize"))
    elif link and not run_dir.exists():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(link).resolve(), run_dir, target_is_directory=True)
    t0 = time.time()
    outputs = run_pipeline(cfg)
    eval_path = large_eval_set(seed_cfg, n_eval)
    dirs = {"M0": outputs["phase0"]["model_dir"], "M1": outputs["sft"]["model_dir"],
            "SFT-continued": outputs["sft_continued"]["model_dir"], "WMSS": outputs["wmss_1"]["model_dir"]}
    evals = {m: evaluate_cached(cfg, m, d, eval_path, run_dir / "study" / "eval") for m, d in dirs.items()}
    demo_eval = {m: {k: v[k] for k in ("accuracy", "loss", "n")} for m, v in outputs["eval"]["models"].items()}
    phase_seconds = {}
    for phase, out in outputs.items():
        man = run_dir / phase / "manifest.json"
        if man.exists():
            phase_seconds[phase] = json.loads(man.read_text()).get("seconds")
    return {"seed": seed, "sft_epochs": cfg.training.sft_epochs, "run_dir": str(run_dir.resolve()), "evals": evals, "demo_eval": demo_eval,
            "phase_seconds": phase_seconds, "study_seconds": round(time.time() - t0, 1),
            "wmss_vs_sft": paired(evals["WMSS"], evals["SFT-continued"], "WMSS", "SFT-continued").to_dict()}


def half_sft_model(base: WMSSConfig) -> str:
    """An SFT model trained for half an epoch from the same M0 (a weak agent closer to M1)."""
    from wmss_ray.pipeline import run_pipeline

    cfg = config_from_dict(base.to_dict(), [f"run.storage={Path(base.run_dir()).resolve() / 'ablations'}",
                                            "run.name=_half_epoch_sft", "training.sft_epochs=0.5"])
    link_shared_phases(Path(base.run_dir()).resolve(), Path(cfg.run_dir()), ("data", "phase0", "tokenize"))
    return run_pipeline(cfg, until="sft")["sft"]["model_dir"]


def run_variant(base: WMSSConfig, name: str, seed_result: dict, n_eval: int) -> dict[str, Any]:
    from wmss_ray.pipeline import run_pipeline

    overrides, weak = VARIANTS[name]
    base_run = Path(base.run_dir()).resolve()
    if weak == "M1":
        weak_dir = seed_result["evals"]["M1"]["model_dir"]
    else:
        weak_dir = half_sft_model(base) if weak == "half-sft" else None
    slug = slugify(name)
    cfg = config_from_dict(base.to_dict(), overrides + [
        f"run.storage={base_run / 'ablations'}", f"run.name={slug}", "evaluation.sft_continued=false",
        *([f"models.weak={weak_dir}"] if weak_dir else [])])
    # A new weak model means new entropy scores, so score_1 is linked only when the weak is M0.
    link_shared_phases(base_run, Path(cfg.run_dir()), UPSTREAM if weak_dir else (*UPSTREAM, "score_1"))
    t0 = time.time()
    outputs = run_pipeline(cfg, until="wmss_1")
    eval_path = large_eval_set(base, n_eval)
    out = Path(cfg.run_dir()) / "study" / "eval"
    ev = evaluate_cached(cfg, name, outputs["wmss_1"]["model_dir"], eval_path, out)
    result = {"name": name, "overrides": overrides, "weak_model": weak_dir or "M0", "eval": ev,
              "steps": outputs["wmss_1"]["steps"], "seconds": round(time.time() - t0, 1),
              "vs_sft": paired(ev, seed_result["evals"]["SFT-continued"], name, "SFT-continued").to_dict(),
              "vs_wmss": paired(ev, seed_result["evals"]["WMSS"], name, "WMSS").to_dict()}
    if weak_dir:
        result["weak_eval"] = evaluate_cached(cfg, f"weak {weak}", weak_dir, eval_path, out)
    return result


# ----------------------------------------------------------------------------- the write-up


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _diff(p: dict) -> str:
    return (f"{100 * p['diff']:+.1f} [{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}], "
            f"{p['only_a']} vs {p['only_b']}, p={p['p_value']:.2g}")


SEED_HEADER = ["| seed | M0 | M1 | SFT-continued | WMSS | WMSS − SFT-continued | loss SFT-c / WMSS | demo's own eval: SFT-c / WMSS | phases (s) |",
               "|---|---|---|---|---|---|---|---|---|"]


def _seed_row(s: dict) -> str:
    e, d = s["evals"], s["demo_eval"]
    secs = sum(v for v in s["phase_seconds"].values() if v)
    return (f"| {s['seed']} | " + " | ".join(_pct(e[m]["accuracy"]) for m in MODELS)
            + f" | {_diff(s['wmss_vs_sft'])} | {e['SFT-continued']['loss']:.4f} / {e['WMSS']['loss']:.4f}"
            + f" | {_pct(d['SFT-continued']['accuracy'])} / {_pct(d['WMSS']['accuracy'])} | {secs:.0f} |")


def _pooled(runs: list[dict], key: str | None = "eval") -> dict:
    """Per-problem outcomes of several seeds' runs as one paired-test input (ids made unique by seed)."""
    return {"correct": {f"{r['seed']}/{k}": v for r in runs for k, v in (r[key] if key else r)["correct"].items()}}


def write_up(seeds: list[dict], ablations: list[dict], n_eval: int, command: str,
             saturated: dict | None = None) -> str:
    lines = ["# Demo study: WMSS vs SFT-continued", "", f"Command: `{command}`", "",
             f"Held-out set: the first {n_eval} problems of each seed's eval split (the demo's own "
             "300 are its first 300). Differences are WMSS minus the other model in accuracy points, "
             "95 % paired bootstrap CI, discordant problems (only A right vs only B right), exact "
             "McNemar p.", "", "## Per seed", "", *SEED_HEADER]
    lines += [_seed_row(s) for s in seeds]
    lines += ["", "## Across seeds (mean ± sample std, [min, max])", "", "| model | accuracy | loss |", "|---|---|---|"]
    for m in MODELS:
        acc = mean_and_spread(s["evals"][m]["accuracy"] for s in seeds)
        loss = mean_and_spread(s["evals"][m]["loss"] for s in seeds)
        lines.append(f"| {m} | {_pct(acc[0])} ± {100 * acc[1]:.1f} [{_pct(acc[2])}, {_pct(acc[3])}] "
                     f"| {loss[0]:.4f} ± {loss[1]:.4f} |")
    pooled_a = {f"{s['seed']}/{k}": v for s in seeds for k, v in s["evals"]["WMSS"]["correct"].items()}
    pooled_b = {f"{s['seed']}/{k}": v for s in seeds for k, v in s["evals"]["SFT-continued"]["correct"].items()}
    p = paired({"correct": pooled_a}, {"correct": pooled_b}, "WMSS", "SFT-continued").to_dict()
    lines += ["", f"Pooled over {len(seeds)} seeds ({p['n']} problem-runs): WMSS − SFT-continued {_diff(p)}.", ""]
    if saturated:
        lines += [f"## Saturated M1 (seed {saturated['seed']}: phase 1 = {saturated['sft_epochs']:g} SFT epochs, "
                  "then one WMSS epoch vs one more SFT epoch)", "", *SEED_HEADER, _seed_row(saturated), ""]
    if ablations:
        by_seed = {s["seed"]: s for s in seeds}
        lines += ["## Ablations (same M0/M1/corpus as the seed's run, same number of steps)", "",
                  "| seed | variant | weak agent (accuracy) | accuracy | loss | − SFT-continued | − WMSS default |",
                  "|---|---|---|---|---|---|---|"]
        for seed in dict.fromkeys(a["seed"] for a in ablations):
            base = by_seed[seed]
            lines.append(f"| {seed} | WMSS default (joint, λ 0.5, curriculum) | M0 ({_pct(base['evals']['M0']['accuracy'])}) "
                         f"| {_pct(base['evals']['WMSS']['accuracy'])} | {base['evals']['WMSS']['loss']:.4f} "
                         f"| {_diff(base['wmss_vs_sft'])} | — |")
            for a in (a for a in ablations if a["seed"] == seed):
                label = {None: "M0", "M1": "M1", "half-sft": "half-epoch SFT"}[VARIANTS[a["name"]][1]]
                weak = f"{label} ({_pct((a.get('weak_eval') or base['evals']['M0'])['accuracy'])})"
                lines.append(f"| {seed} | {a['name']} | {weak} | {_pct(a['eval']['accuracy'])} | {a['eval']['loss']:.4f} "
                             f"| {_diff(a['vs_sft'])} | {_diff(a['vs_wmss'])} |")
        multi = {}  # variant -> its runs, for variants run on more than one seed
        for name in dict.fromkeys(a["name"] for a in ablations):
            runs = [a for a in ablations if a["name"] == name]
            if len(runs) > 1:  # pooled per problem over the seeds it ran on
                multi[name] = runs
                sft = [by_seed[a["seed"]]["evals"]["SFT-continued"] | {"seed": a["seed"]} for a in runs]
                p = paired(_pooled(runs), _pooled(sft, key=None), name, "SFT-continued").to_dict()
                acc = mean_and_spread(a["eval"]["accuracy"] for a in runs)
                lines += ["", f"{name} over seeds {', '.join(str(a['seed']) for a in runs)}: accuracy "
                          f"{_pct(acc[0])} ± {100 * acc[1]:.1f}; pooled ({p['n']} problem-runs) − SFT-continued {_diff(p)}."]
        names = list(multi)
        for i, a_name in enumerate(names):  # variants on the same seeds, against each other
            for b_name in names[i + 1:]:
                if [r["seed"] for r in multi[a_name]] == [r["seed"] for r in multi[b_name]]:
                    p = paired(_pooled(multi[a_name]), _pooled(multi[b_name]), a_name, b_name).to_dict()
                    lines += ["", f"{a_name} − {b_name}, pooled over the same seeds ({p['n']} problem-runs): {_diff(p)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEMO_CONFIG), help="the base config (default: configs/demo.yaml)")
    ap.add_argument("--storage", default="runs/study", help="study root: <storage>/seed<N> per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-eval", type=int, default=2000, help="held-out problems per seed")
    ap.add_argument("--ablate-seed", type=int, default=None, help="run the ablations on this seed")
    ap.add_argument("--variants", nargs="*", default=None, help=f"subset of: {', '.join(VARIANTS)}")
    ap.add_argument("--extra", action="append", default=[], metavar="SEED:VARIANT",
                    help="also run one variant on another seed (e.g. to confirm an ablation's finding)")
    ap.add_argument("--saturated-epochs", type=float, default=None,
                    help="also run the ablation seed with this many SFT epochs in phase 1 (a saturated M1)")
    ap.add_argument("--link-run", action="append", default=[], metavar="SEED=DIR",
                    help="reuse an existing demo run directory for a seed")
    ap.add_argument("--out", default=None, help="write the markdown here too")
    args = ap.parse_args(argv)
    storage = Path(args.storage).resolve()
    links = dict(item.split("=", 1) for item in args.link_run)
    from wmss_ray.cluster import ensure_ray

    ensure_ray()
    seeds = []
    for seed in args.seeds:
        seeds.append(run_seed(args.config, storage, seed, args.n_eval, links.get(str(seed))))
        print(f"[study] seed {seed}: " + ", ".join(f"{m} {_pct(seeds[-1]['evals'][m]['accuracy'])}" for m in MODELS), flush=True)
    jobs = [(args.ablate_seed, name) for name in args.variants or VARIANTS] if args.ablate_seed is not None else []
    jobs += [(int(seed), name) for seed, name in (e.split(":", 1) for e in args.extra)]
    by_seed = {s["seed"]: s for s in seeds}
    ablations = []
    for seed, name in jobs:
        if name not in VARIANTS or seed not in by_seed:
            raise SystemExit(f"unknown variant {name!r} or seed {seed} not in --seeds")
        res = run_variant(seed_config(args.config, storage, seed), name, by_seed[seed], args.n_eval)
        res["seed"] = seed
        ablations.append(res)
        print(f"[study] seed {seed} {name}: {_pct(res['eval']['accuracy'])} ({_diff(res['vs_sft'])} vs SFT-continued)", flush=True)
    saturated = None
    if args.saturated_epochs is not None and args.ablate_seed is not None:
        saturated = run_seed(args.config, storage, args.ablate_seed, args.n_eval, sft_epochs=args.saturated_epochs)
        print(f"[study] saturated M1 ({args.saturated_epochs:g} epochs): "
              + ", ".join(f"{m} {_pct(saturated['evals'][m]['accuracy'])}" for m in MODELS), flush=True)
    command = "python benchmarks/demo_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = write_up(seeds, ablations, args.n_eval, command, saturated)
    strip = lambda d: {k: v for k, v in d.items() if k != "correct"}  # noqa: E731
    (storage / "study.json").write_text(json.dumps({
        "seeds": [{**s, "evals": {m: strip(e) for m, e in s["evals"].items()}} for s in seeds],
        "saturated": saturated and {**saturated, "evals": {m: strip(e) for m, e in saturated["evals"].items()}},
        "ablations": [{**a, "eval": strip(a["eval"]), **({"weak_eval": strip(a["weak_eval"])} if "weak_eval" in a else {})}
                      for a in ablations]}, indent=2))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
