"""End to end: the shrunken demo (configs/test-tiny.yaml) through every phase on a real Ray.

The run itself is the session fixture ``tiny_job_run`` (tests/conftest.py): the pipeline
submitted once as a real Ray job with token auth (what tests/cli/test_submit_real.py checks).
Here: what every phase must have produced (counts that add up, finite metrics, steps, eval rows),
that an in-process re-run skips everything, that ``--from`` reruns exactly the later phases, that
the exported WMSS model reloads in plain transformers and generates, that a changed
``curriculum.beta`` changes the report's weights without rescoring, and a Tune trial.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from wmss_ray.config.loading import config_from_dict
from wmss_ray.pipeline import build_phases, run_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_run(tiny_job_run, ray_cluster):
    """``(cfg, outputs, finished_at before the in-process re-run)``; outputs from that re-run."""
    if tiny_job_run.status != "SUCCEEDED":
        pytest.fail(f"the tiny pipeline job {tiny_job_run.job_id} ended {tiny_job_run.status}:\n"
                    f"{tiny_job_run.logs[-6000:]}")
    cfg = tiny_job_run.cfg
    before = {p.name: _manifest(cfg, p.name)["finished_at"] for p in build_phases(cfg)}
    outputs = run_pipeline(cfg)  # every phase completed in the job: all are skipped here
    return cfg, outputs, before


def _manifest(cfg, phase):
    return json.loads((Path(cfg.run_dir()) / phase / "manifest.json").read_text())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_phase_completed_with_outputs(tiny_run):
    cfg, outputs, before = tiny_run
    names = [p.name for p in build_phases(cfg)]
    assert list(outputs) == names
    for name in names:
        man = _manifest(cfg, name)
        assert man["status"] == "completed", name
        assert man["config_hash"] == cfg.config_hash()
        assert man["outputs"] == outputs[name]
    assert {p: _manifest(cfg, p)["finished_at"] for p in names} == before  # the re-run skipped all


def test_every_phase_counts_add_up(tiny_run):
    import pyarrow.parquet as pq

    cfg, out, _ = tiny_run
    tok = _manifest(cfg, "tokenize")["counts"]
    assert tok["rows_in"] == cfg.data.demo.n_train == tok["rows_ok"] + tok["rows_rejected"]
    assert tok["rows_rejected"] == sum(tok["rejected_by_reason"].values())
    n = tok["rows_ok"]
    assert n > 0 and pq.read_table(out["tokenize"]["tokenized"]).num_rows == n
    scores = pq.read_table(out["score_1"]["scores"]).to_pandas()
    assert _manifest(cfg, "score_1")["counts"]["rows_scored"] == len(scores) == n and scores["sample_id"].is_unique
    assert "weight" not in scores  # weights depend on curriculum.*, scores do not
    assert scores[["h_weak", "h_strong"]].map(math.isfinite).all().all() and (scores["n_answer_tokens"] > 0).all()
    cur = _manifest(cfg, "curriculum_1")["counts"]
    draws = round(n * cfg.curriculum.sample_multiplier)
    sampled = pq.read_table(out["curriculum_1"]["sampled_ids"]).to_pandas()
    assert len(sampled) == draws == cur["draws"] and cur["rows_scored"] == n
    assert set(sampled["sample_id"]) <= set(scores["sample_id"])
    weights = pq.read_table(out["curriculum_1"]["weights"]).to_pandas()
    assert len(weights) == n and abs(weights["weight"].sum() - 1.0) < 1e-9
    assert weights["draws"].max() == cur["max_draws_per_sample"] and weights["draws"].sum() == draws
    assert 1.0 <= cur["effective_sample_size"] <= n
    # steps: ceil(N * epochs / global batch) capped by training.max_steps (3 in the tiny config);
    # equal compute: sft_continued ran exactly as many optimizer steps as WMSS
    t = cfg.training
    batch = t.micro_batch_size * t.grad_accum * cfg.scaling.num_workers
    expect = {"sft": min(t.max_steps, math.ceil(n * t.sft_epochs / batch)),
              "wmss_1": min(t.max_steps, math.ceil(draws * t.wmss_epochs / batch))}
    expect["sft_continued"] = expect["wmss_1"]
    for phase, steps in expect.items():
        assert out[phase]["steps"] == _manifest(cfg, phase)["counts"]["steps"] == steps > 0, phase
        lines = [json.loads(line) for line in Path(out[phase]["metrics"]).read_text().splitlines()]
        assert [m["step"] for m in lines] == list(range(1, steps + 1)), phase  # log_every: 1
        keys = ["loss", "ce_strong", "p_mix", "p_strong", "grad_norm", "lr", "tokens_per_s"]
        keys += ["nontarget_ratio"] if phase == "wmss_1" else []  # only defined for the mix
        for m in lines:
            assert all(_finite(m[k]) for k in keys), (phase, m)
            assert m["loss"] > 0 and 0 < m["p_mix"] < 1 and m["grad_norm"] > 0
    p0 = json.loads((Path(out["phase0"]["model_dir"]) / "phase0_metrics.json").read_text())
    assert p0["steps"] == cfg.phase0.steps and _finite(p0["final_loss"]) and p0["final_loss"] > 0


def test_eval_rows_and_report(tiny_run):
    cfg, out, _ = tiny_run
    models = out["eval"]["models"]
    assert set(models) == {"M0", "M1", "SFT-continued", "WMSS"}
    results = json.loads(Path(out["eval"]["results"]).read_text())["models"]
    for name, m in models.items():
        rows = [json.loads(line) for line in Path(results[name]["per_sample_path"]).read_text().splitlines()]
        assert m["n"] == len(rows) == cfg.data.demo.n_eval
        assert m["accuracy"] == sum(r["correct"] for r in rows) / len(rows)  # the table is the rows
        assert len({r["sample_id"] for r in rows}) == len(rows)
        tokens = sum(r["n_tokens"] for r in rows)
        assert tokens > 0 and m["loss"] == pytest.approx(sum(r["nll"] for r in rows) / tokens)
    assert out["eval"]["checker"] == "demo" and out["eval"]["eval_set"]["name"] == "test"
    html = Path(out["report"]["report"]).read_text()
    assert "WMSS" in html and "SFT-continued" in html and "data:image/png;base64" in html
    assert "answer checker <b>demo</b>" in html and "test set" in html
    data = json.loads((Path(out["report"]["report"]).parent / "report_data.json").read_text())
    assert data["weights"] == out["curriculum_1"]["weights"]  # the weights the draw used
    cur = _manifest(cfg, "curriculum_1")["counts"]
    hist = data["weight_histogram"]
    assert sum(hist["counts"]) == cur["rows_scored"]
    assert hist["effective_sample_size"] == pytest.approx(cur["effective_sample_size"])
    assert hist["max_draws_per_sample"] == cur["max_draws_per_sample"]


def test_from_reruns_exactly_the_later_phases(tiny_run):
    cfg, out, before = tiny_run
    run_pipeline(cfg, from_phase="eval")
    after = {p: _manifest(cfg, p)["finished_at"] for p in out}
    assert [p for p in out if after[p] != before[p]] == ["eval", "report"]


def test_exported_wmss_model_generates_in_plain_transformers(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = tiny_run
    model_dir = out["wmss_1"]["model_dir"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Compute 2 + 3."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_changed_beta_changes_the_reports_weights_without_rescoring(tiny_run):
    """curriculum.beta is not an input of scoring: a run with another beta links data ... score_1
    (a linked phase is never rerun: the runner would raise) and redraws; its report's weight
    histogram describes the new weights, not the ones scoring time would have stored."""
    from wmss_ray.stages.report import write_report
    from wmss_ray.sweep.driver import link_shared_phases

    cfg, out, _ = tiny_run
    run_dir = Path(cfg.run_dir())
    beta = config_from_dict(cfg.to_dict(), ["curriculum.beta=0.05", f"run.name={cfg.run.name}-beta"])
    shared = ("data", "phase0", "tokenize", "sft", "score_1")
    link_shared_phases(run_dir.resolve(), Path(beta.run_dir()), shared)
    got = run_pipeline(beta, until="curriculum_1")
    assert got["score_1"] == out["score_1"]  # the same scores, not rescored
    assert _manifest(beta, "score_1")["finished_at"] == _manifest(cfg, "score_1")["finished_at"]
    page = write_report(beta.run_dir())
    new = json.loads((page.parent / "report_data.json").read_text())
    old = json.loads((run_dir / "report" / "report_data.json").read_text())
    assert new["weights"] == str(Path(beta.run_dir()) / "curriculum_1" / "weights.parquet")
    assert new["weight_histogram"] != old["weight_histogram"]
    assert new["weight_histogram"]["effective_sample_size"] != old["weight_histogram"]["effective_sample_size"]
    assert new["weight_histogram"]["effective_sample_size"] == pytest.approx(
        _manifest(beta, "curriculum_1")["counts"]["effective_sample_size"])




def test_summary_and_report_have_phase_timings(tiny_run):
    """Issue 30 item 3: ``<run>/summary.json`` holds every phase's time, throughput and
    resources and the WMSS/SFT step-time ratio; the report shows the phases before it."""
    cfg, out, _ = tiny_run
    summary = json.loads((Path(cfg.run_dir()) / "summary.json").read_text())
    t = summary["timings"]
    names = [p.name for p in build_phases(cfg)]
    assert [r["phase"] for r in t["phases"]] == names
    for r in t["phases"]:
        assert r["status"] == "completed" and r["seconds"] == _manifest(cfg, r["phase"])["seconds"] >= 0
        assert r["resources"]["CPU"] > 0
    rows = {r["phase"]: r for r in t["phases"]}
    assert rows["score_1"]["rows"] == _manifest(cfg, "score_1")["counts"]["rows_scored"] and rows["score_1"]["per_s"] > 0
    assert rows["wmss_1"]["steps"] == out["wmss_1"]["steps"] and rows["wmss_1"]["tokens_per_s"] > 0
    assert t["wmss_sft_step_ratio"] > 0 and t["ratio_against"] == "sft_continued"
    assert set(summary["results"]) == set(out["eval"]["models"])
    html = Path(out["report"]["report"]).read_text()
    assert "<h2>Phase timings</h2>" in html and "<td>wmss_1</td>" in html and "WMSS/SFT step time" in html


def test_the_tiny_run_in_a_local_mlflow_store(tiny_run, tmp_path, monkeypatch):
    """Issue 30 item 2: ``run.trackers: [mlflow]`` with ``MLFLOW_TRACKING_URI`` at a local file
    store has every training phase's logged metrics per step, the eval results and the report
    (sent from this run's directory as `wmss run` does at its end; no second pipeline run)."""
    from mlflow.tracking import MlflowClient

    from wmss_ray.stages.trackers import log_run

    cfg, out, _ = tiny_run
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracked = config_from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "trackers": ["mlflow"]}})
    ids = log_run(tracked, [p.name for p in build_phases(cfg)])
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(ids["mlflow"])
    for phase in ("sft", "wmss_1", "sft_continued"):
        rows = [json.loads(line) for line in Path(out[phase]["metrics"]).read_text().splitlines()]
        history = client.get_metric_history(ids["mlflow"], f"{phase}/loss")
        assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in rows], phase
    for model, m in out["eval"]["models"].items():
        assert run.data.metrics[f"eval/{model}/accuracy"] == m["accuracy"]
    assert {p.name for p in build_phases(cfg)} <= {k[len("time/"):-2] for k in run.data.metrics if k.startswith("time/")}
    assert {"report.html", "eval_results.json", "summary.json"} <= {a.path for a in client.list_artifacts(ids["mlflow"])}


def _top_logit_tie(model, tok, prompt: list[int], text_a: str, text_b: str) -> bool:
    """Whether two greedy completions part where the model's top two logits tie (the first token
    where they differ is the top-2 of one forward, within float noise)."""
    import torch

    a, b = tok(text_a, add_special_tokens=False)["input_ids"], tok(text_b, add_special_tokens=False)["input_ids"]
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + a[:n]])).logits[0, -1]
    top2 = torch.topk(logits, 2)
    return float(top2.values[0] - top2.values[1]) < 1e-4 * max(1.0, float(top2.values[0].abs()))


def test_vllm_gives_the_hf_greedy_completions_and_samples_pass_at_k(tiny_run, tmp_path):
    """`evaluation.engine: vllm` on the run's M1 and WMSS: the same greedy completions as the run's
    own (HF) evaluation, except where the top two logits tie (identified, not tolerated blindly);
    4 samples at temperature 0.7 give avg@4 and pass@4 with paired comparisons in the report."""
    from wmss_ray.data.chat_tokens import generation_prompt_ids
    from wmss_ray.models.loading import load_causal_lm, load_tokenizer
    from wmss_ray.stages.evaluate import evaluate_models, load_eval_rows, read_per_sample
    from wmss_ray.stages.report import write_report

    cfg, out, _ = tiny_run
    vcfg = config_from_dict(cfg.to_dict(), ["evaluation.engine=vllm", "evaluation.samples=4",
                                            "evaluation.temperature=0.7", "evaluation.vllm.cpu_kv_cache_gib=0.25"])
    hf_results = json.loads(Path(out["eval"]["results"]).read_text())["models"]
    # Two of the four models (each engine start costs an actor): the pair the report compares.
    models = {name: hf_results[name]["model_dir"] for name in ("M1", "WMSS")}
    eval_dir = tmp_path / "eval"
    results = evaluate_models(models, _eval_path(out), vcfg, eval_dir)
    ties = {}
    for name, res in results.items():
        assert res.engine == "vllm" and res.n == hf_results[name]["n"] and res.n_rejected == 0
        hf_rows = read_per_sample(hf_results[name]["per_sample_path"])
        differ = [(h, v) for h, v in zip(hf_rows, res.per_sample) if h["generated"] != v["generated"]]
        if differ:
            model, tok = load_causal_lm(models[name]), load_tokenizer(models[name])
            rows = {r["sample_id"]: r for r in load_eval_rows(_eval_path(out), vcfg)}
            for h, v in differ:
                r = rows[h["sample_id"]]
                prompt = generation_prompt_ids(tok, r["prompt_messages"], r["answer"])
                assert _top_logit_tie(model, tok, prompt, h["generated"], v["generated"]), (name, h, v)
        ties[name] = len(differ)
        assert [r["correct"] for r in res.per_sample] == [r["correct"] for r in hf_rows] or differ
        assert res.sampling == {"samples": 4, "temperature": 0.7, "top_p": 0.95, "seed": cfg.run.seed}
        assert all(len(r["sampled_correct"]) == 4 for r in res.per_sample)
        assert 0 <= res.avg_at_k <= res.pass_at_k <= 1
    print("greedy completions that differ at a top-logit tie, per model:", ties)
    html = write_report(cfg.run_dir(), results={"eval_dir": str(eval_dir)}, out_path=tmp_path / "r" / "report.html")
    page = html.read_text()
    assert "Generated with <b>vllm</b>" in page and "4 sampled completions per problem" in page
    assert "avg@4" in page and "pass@4" in page
    data = json.loads((tmp_path / "r" / "report_data.json").read_text())
    assert [(p["name_a"], p["name_b"], p["k"]) for p in data["paired_sampled"]] == [("WMSS", "M1", 4)]


def _eval_path(out) -> str:
    """The test set the run evaluated on (its eval_results.json says which file)."""
    return json.loads(Path(out["eval"]["results"]).read_text())["eval_set"]["source"]
