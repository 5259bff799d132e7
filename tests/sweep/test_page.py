"""wmss_ray.sweep.page: the sweep page from synthetic sweep files (no Ray). Each test builds a sweep
directory in the formats wmss_ray/sweep/driver.py writes (results.csv, curves.csv, final.json)."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from wmss_ray.sweep.page import main, rank_rows, read_curves, read_results, write_sweep_page
from wmss_ray.sweep.page_plots import plot_knobs, plot_learning_curves, plot_metric_vs_param

FIXED_TAIL = ["validation_accuracy", "validation_loss", "n_validation", "step", "seeds", "accuracy_std",
              "diff_vs_sft", "diff_ci_low", "diff_ci_high", "p_value"]
PARAMS = ["curriculum.alpha", "curriculum.beta", "curriculum.formula", "curriculum.gamma", "mix.lam"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# trial, status, alpha, beta, formula, gamma, lam, acc, loss, n, step, seeds, std, diff, lo, hi, p
TRIALS = [
    ("trial_c0", "completed", 1.0, 0.5, "linear", 0.1, 0.5, 0.60, 0.90, 64, 12, 2, 0.02, 0.05, 0.01, 0.09, 0.03),
    ("trial_c1", "completed", 2.0, 1.0, "exp", 0.2, 0.8, 0.70, 1.10, 64, 12, 1, "", 0.15, 0.08, 0.22, 0.001),
    ("trial_c2", "completed", 0.5, 2.0, "linear", 0.3, 0.2, 0.55, 0.80, 64, 12, 1, "", "", "", "", ""),
    ("trial_s3", "stopped", 1.5, 0.2, "exp", 0.4, 0.9, 0.75, 0.70, 16, 4, 1, "", "", "", "", ""),
    ("trial_s4", "stopped", 0.2, 1.5, "linear", 0.5, 0.1, 0.40, 1.50, 16, 4, 1, "", "", "", "", ""),
    ("trial_e5", "error", 3.0, 3.0, "exp", 0.6, 0.3, "", "", "", "", "", "", "", "", "", ""),
]
CURVES = {  # trial -> [(step, acc, loss, n, final)]
    "trial_c0": [(4, 0.5, 1.0, 16, False), (8, 0.55, 0.95, 16, False), (12, 0.60, 0.90, 64, True)],
    "trial_c1": [(4, 0.6, 1.2, 16, False), (12, 0.70, 1.10, 64, True)],
    "trial_c2": [(12, 0.55, 0.80, 64, True)],
    "trial_s3": [(4, 0.75, 0.70, 16, False)],
    "trial_s4": [(4, 0.40, 1.50, 16, False)],
}
FINAL = {"trial": "trial_c1", "params": {"mix.lam": 0.8, "curriculum.formula": "exp"},
         "eval_set": {"name": "test", "n": 160, "source": "demo/test.jsonl"},
         "sft_continued": {"accuracy": 0.5125, "loss": 1.2345},
         "wmss": [{"seed": 0, "accuracy": 0.575, "loss": 1.1}, {"seed": 1, "accuracy": 0.5625, "loss": 1.11}],
         "paired": [{"name_a": "WMSS", "name_b": "SFT-continued", "n": 160, "acc_a": 0.575, "acc_b": 0.5125,
                     "diff": 0.0625, "both": 70, "only_a": 22, "only_b": 12, "neither": 56, "p_value": 0.0213,
                     "ci_low": 0.0125, "ci_high": 0.1125, "ci_level": 0.95}]}


def _write_results(root, trials, params=PARAMS):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", *params, *FIXED_TAIL])
        w.writerows(trials)


def _write_curves(root, curves, status):
    with open(root / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "step", "validation_accuracy", "validation_loss", "n_validation", "final"])
        for trial, pts in curves.items():
            w.writerows([trial, status[trial], *p] for p in pts)


def _sweep(tmp_path, final=True):
    root = tmp_path / "run" / "tune"
    _write_results(root, TRIALS)
    _write_curves(root, CURVES, {t[0]: t[1] for t in TRIALS})
    if final:
        (root / "final.json").write_text(json.dumps(FINAL))
    return root


def _table_trials(page: str) -> list[str]:
    """The trial ids of the trial table, in row order."""
    section = page.split("<h2>Trials (validation split)</h2>", 1)[1].split("<h2>", 1)[0]
    return re.findall(r"<tr><td>\d+</td><td>([^<]*)</td>", section)


def _assert_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100 and float(np.std(img[..., :3])) > 0.01


def test_full_sweep_page(tmp_path):
    root = _sweep(tmp_path)
    index = write_sweep_page(root)
    assert index == root / "page" / "index.html"
    page = index.read_text()
    pngs = ["metric_vs_lam.png", "knobs.png", "learning_curves.png", "categories.png"]
    for name in pngs:
        _assert_png(root / "page" / name)
    assert page.count("data:image/png;base64,") == len(pngs)  # one self-contained file
    for t in TRIALS:
        assert t[0] in page
    # completed best first by accuracy; stopped ones after, however high their subsample value
    assert _table_trials(page) == ["trial_c1", "trial_c0", "trial_c2", "trial_s3", "trial_s4", "trial_e5"]
    assert "3 completed, 2 stopped by ASHA, 1 error, 0 pending" in page
    assert page.count("<td>stopped by ASHA</td>") == 2
    # the held-out result: paired diff, CI, McNemar p and each WMSS seed, formatted
    final = page.split("<h2>Final held-out result", 1)[1].split("<h2>", 1)[0]
    assert "+0.0625 [+0.0125, +0.1125]" in final and "<td>0.0213</td>" in final and "<td>95%</td>" in final
    assert "<td>0.5750</td>" in final and "<td>0.5625</td>" in final and "<td>0.5125</td>" in final
    # the validation diff of a trial in the table
    assert "+0.1500 [+0.0800, +0.2200]" in page and "+0.0500 [+0.0100, +0.0900]" in page
    assert "No final held-out evaluation" not in page and "mix.lam is not a swept" not in page
    # a re-render without string params removes the stale categories.png
    _write_results(root, [(*t[:4], *t[5:]) for t in TRIALS], params=[k for k in PARAMS if k != "curriculum.formula"])
    write_sweep_page(root)
    assert not (root / "page" / "categories.png").exists() and (root / "page" / "knobs.png").exists()


def test_mode_min_on_loss_orders_by_lowest_loss(tmp_path):
    page = write_sweep_page(_sweep(tmp_path), metric="validation_loss", mode="min").read_text()
    assert _table_trials(page) == ["trial_c2", "trial_c0", "trial_c1", "trial_s3", "trial_s4", "trial_e5"]


def test_rank_rows_groups_by_status_then_metric():
    rows = [{"trial": "a", "status": "stopped", "m": 0.9}, {"trial": "b", "status": "completed", "m": math.nan},
            {"trial": "c", "status": "completed", "m": 0.2}, {"trial": "d", "status": "pending", "m": math.nan},
            {"trial": "e", "status": "completed", "m": 0.5}, {"trial": "f", "status": "error", "m": 0.99}]
    assert [r["trial"] for r in rank_rows(rows, "m", "max")] == ["e", "c", "b", "a", "f", "d"]
    assert [r["trial"] for r in rank_rows(rows, "m", "min")] == ["c", "e", "b", "a", "f", "d"]
    with pytest.raises(ValueError, match="mode"):
        rank_rows(rows, "m", "best")


def test_plots_draw_the_trials_data(tmp_path):
    root = _sweep(tmp_path)
    rows, numeric, categorical = read_results(root / "results.csv")
    assert numeric == ["curriculum.alpha", "curriculum.beta", "curriculum.gamma", "mix.lam"]
    assert categorical == ["curriculum.formula"]
    _, drawn = plot_metric_vs_param(rows, "validation_accuracy", numeric, tmp_path / "a.png")
    assert drawn["x"] == "mix.lam"
    assert sorted(drawn["series"]["completed"]) == [("trial_c0", 0.5, 0.60, 0.02), ("trial_c1", 0.8, 0.70, None),
                                                    ("trial_c2", 0.2, 0.55, None)]  # std only where seeds > 1
    assert sorted(p[0] for p in drawn["series"]["stopped"]) == ["trial_s3", "trial_s4"]
    assert "error" not in drawn["series"]  # no value reported
    _, knobs = plot_knobs(rows, "validation_accuracy", numeric, tmp_path / "k.png")
    assert knobs["keys"] == ["mix.lam", "curriculum.alpha", "curriculum.beta", "curriculum.gamma"]
    assert {p[0]: p[2] for p in knobs["points"]}["trial_e5"] is None  # drawn grey, not dropped

    status = {t[0]: t[1] for t in TRIALS}
    _, lines = plot_learning_curves(read_curves(root / "curves.csv"), status, tmp_path / "c.png")
    acc = {d["trial"]: d for d in lines if d["panel"] == "validation_accuracy"}
    assert acc["trial_s3"]["linestyle"] == "--" and acc["trial_s3"]["end_marker"] == "x"
    assert acc["trial_c0"]["linestyle"] == "-" and acc["trial_c0"]["end_marker"] == "D"
    assert acc["trial_c0"]["steps"] == [4, 8, 12] and acc["trial_c0"]["values"] == [0.5, 0.55, 0.60]
    assert {d["panel"] for d in lines} == {"validation_accuracy", "validation_loss"}


def test_metric_plot_falls_back_to_first_numeric_param_and_knobs_degenerate(tmp_path):
    root = tmp_path / "tune"
    _write_results(root, [("t0", "completed", 0.3, "a", 0.6, 0.9, 64, 8, 1, "", "", "", "", ""),
                          ("t1", "completed", 0.7, "b", 0.5, 1.0, 64, 8, 1, "", "", "", "", "")],
                   params=["curriculum.beta", "mix.mode"])
    page = write_sweep_page(root).read_text()
    assert "<td>a</td>" in page and "<td>b</td>" in page  # the string param in the table
    assert "mix.lam is not a swept numeric parameter: plotted against curriculum.beta" in page
    rows, numeric, _ = read_results(root / "results.csv")
    _, drawn = plot_metric_vs_param(rows, "validation_accuracy", numeric, tmp_path / "a.png")
    assert drawn["x"] == "curriculum.beta"
    path, knobs = plot_knobs(rows, "validation_accuracy", numeric, tmp_path / "k.png")
    assert knobs["keys"] == ["curriculum.beta"] and path is not None  # one strip
    _assert_png(path)
    path, knobs = plot_knobs(rows, "validation_accuracy", [], tmp_path / "k0.png")
    assert path is None and not (tmp_path / "k0.png").exists()


def test_results_only_sweep_says_what_is_missing(tmp_path):
    root = tmp_path / "tune"
    _write_results(root, [("t_err", "error", "", "", "", "", "", *[""] * 10),
                          ("t_pend", "pending", 1.0, 0.5, "x", 0.2, 0.3, *[""] * 10)])
    page = write_sweep_page(root).read_text()
    assert "t_err" in page and "t_pend" in page
    assert "No final held-out evaluation is recorded" in page
    assert "No learning curves" in page and "curves.csv not found" in page
    assert "No trial completed" in page and "No trial reported validation_accuracy" in page
    assert "No parameter view" in page and "data:image/png" not in page
    assert not [p.name for p in (root / "page").glob("*.png")]


def test_empty_results_csv_renders(tmp_path):
    root = tmp_path / "tune"
    _write_results(root, [])
    page = write_sweep_page(root).read_text()
    assert "has no trials" in page and "0 completed" in page


def test_many_trials_page(tmp_path):
    root = tmp_path / "tune"
    rng = np.random.default_rng(0)
    trials = [(f"tr_{i:03d}", "completed" if i % 3 else "stopped", *rng.random(2).round(3), "f",
               *rng.random(2).round(3), *rng.random(2).round(3), 64, 8, 1, "", "", "", "", "") for i in range(70)]
    _write_results(root, trials)
    curves = {t[0]: [(4, 0.5, 1.0, 16, False), (8, t[7], t[8], 64, t[1] == "completed")] for t in trials}
    _write_curves(root, curves, {t[0]: t[1] for t in trials})
    page = write_sweep_page(root).read_text()
    assert all(t[0] in page for t in trials)
    _assert_png(root / "page" / "learning_curves.png")


def test_html_escapes_file_content(tmp_path):
    root = tmp_path / "tune"
    evil = "<script>alert(1)</script>"
    _write_results(root, [("<b>t0</b>", "completed", 1.0, 0.5, evil, 0.1, 0.5, 0.6, 0.9, 64, 8, 1, "", "", "", "",
                           "")])
    final = dict(FINAL, trial=evil, params={"curriculum.formula": evil}, eval_set={"name": evil, "source": evil})
    (root / "final.json").write_text(json.dumps(final))
    page = write_sweep_page(root).read_text()
    assert "<script>" not in page and "<b>t0</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;t0&lt;/b&gt;" in page
    assert "&amp;lt;" not in page  # escaped once, not twice


def test_bad_cells_name_file_row_and_field(tmp_path):
    root = tmp_path / "tune"
    _write_results(root, [TRIALS[0], (*TRIALS[1][:7], "high", *TRIALS[1][8:])])
    with pytest.raises(ValueError, match=r"results.csv row 3 field validation_accuracy.*'high'"):
        write_sweep_page(root)
    _write_results(root, [("t0", "done", *TRIALS[0][2:])])
    with pytest.raises(ValueError, match=r"row 2 field status: 'done'"):
        write_sweep_page(root)
    _write_results(root, [TRIALS[0]])
    (root / "final.json").write_text(json.dumps(dict(FINAL, wmss={"seed": 0})))
    with pytest.raises(ValueError, match=r"final.json field wmss: expected a list"):
        write_sweep_page(root)
    with pytest.raises(FileNotFoundError, match="results.csv"):
        write_sweep_page(tmp_path / "nothing")


def test_cli_prints_the_page_path(tmp_path, capsys):
    root = _sweep(tmp_path, final=False)
    path = main([str(root), "--metric", "validation_loss", "--mode", "min"])
    assert capsys.readouterr().out.strip() == str(path) and path.exists()
    assert "No final held-out evaluation is recorded" in path.read_text()


def test_final_section_names_the_engine_and_shows_sampled_metrics(tmp_path):
    root = _sweep(tmp_path, final=False)
    final = dict(FINAL, engine="vllm", sampling={"samples": 4, "temperature": 0.7, "top_p": 0.95, "seed": 0},
                 sft_continued={**FINAL["sft_continued"], "avg_at_k": 0.41, "pass_at_k": 0.66},
                 wmss=[{**w, "avg_at_k": 0.45 + w["seed"] / 100, "pass_at_k": 0.7} for w in FINAL["wmss"]])
    (root / "final.json").write_text(json.dumps(final))
    page = write_sweep_page(root).read_text()
    assert "<th>avg@4</th><th>pass@4</th>" in page
    assert "<td>0.4100</td><td>0.6600</td>" in page and "<td>0.4600</td>" in page
    assert "Generated with <b>vllm</b>" in page and "4 sampled completions per problem at temperature 0.7" in page
    old = write_sweep_page(_sweep(tmp_path / "old")).read_text()  # a final.json from before: no engine
    assert "avg@" not in old and "Generated with" not in old
