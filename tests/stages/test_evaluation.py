"""Evaluation on a tiny model trained to always answer "#### 7".

The forced answer makes the expected exact-match outcome known per row (reference 7: right,
anything else: wrong), and the loss is checked against a manual single-row computation over the
answer tokens only.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from wmss_ray.config.loading import config_from_dict
from wmss_ray.config.schema import DemoModelConfig
from wmss_ray.data.chat_tokens import collate, tokenize_example
from wmss_ray.models.tiny import build_tiny_model, save_pretrained_model
from wmss_ray.models.tokenizer import build_demo_tokenizer
from wmss_ray.stages.evaluate import evaluate_model, evaluate_models, read_per_sample

FORCED = "#### 7"


def _prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i}+{i % 5}?"}]


@pytest.fixture(scope="module")
def forced_model(tmp_path_factory):
    """A tiny Llama trained (seeded, CPU, a few dozen steps) to answer FORCED to every prompt."""
    tok = build_demo_tokenizer()
    # head_dim 32: vLLM's CPU attention runs it (tests/training/test_validation.py's vLLM ranks)
    mcfg = DemoModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                           max_position_embeddings=128)
    model = build_tiny_model(mcfg, tok, seed=0)
    rows = [tokenize_example(tok, _prompt(i), FORCED, 64) for i in range(16)]
    batch = collate(rows, tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(300):  # stops early once the answer is memorised
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    return save_pretrained_model(model, tok, tmp_path_factory.mktemp("forced") / "model")


def _eval_rows() -> list[dict]:
    rows = []
    for i, ref in enumerate(["7", "8", "7", "12", "7", "7"]):
        rows.append({
            "sample_id": f"e{i}",
            "messages": _prompt(i + 20) + [{"role": "assistant", "content": f"{i}+0={i}\n#### {ref}"}],
            "final_answer": ref,
        })
    # No final_answer field: the reference is parsed from the worked answer.
    rows.append({"sample_id": "noref", "messages": _prompt(3) + [{"role": "assistant", "content": "#### 7"}]})
    return rows


def _cfg(**evaluation):
    # The rows carry their ids in "sample_id": name it, as a training corpus would.
    return config_from_dict({"data": {"max_seq_len": 64, "id_column": "sample_id"},
                             "evaluation": {"batch_size": 3, "max_new_tokens": 10, **evaluation}})


def _manual_loss(model_dir: str, rows: list[dict]) -> tuple[float, int]:
    """Token-weighted answer CE, one row at a time, positions found from the rendered text."""
    from wmss_ray.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    total, count = 0.0, 0
    for r in rows:
        prompt, answer = r["messages"][:-1], r["messages"][-1]["content"]
        p_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(r["messages"], tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(p_text, add_special_tokens=False)["input_ids"])
        # The supervised tokens are exactly the answer text plus "<|im_end|>" (the "\n" after it
        # is template filler: generation stops at <|im_end|>).
        assert tok.decode(ids[n_prompt:-1]) == answer + "<|im_end|>" and tok.decode(ids[-1:]) == "\n"
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        ce = torch.nn.functional.cross_entropy(logits[n_prompt - 1:-2], torch.tensor(ids[n_prompt:-1]), reduction="sum")
        total += ce.item()
        count += len(ids) - n_prompt - 1
    return total / count, count


def test_exact_match_and_loss_on_answer_tokens(forced_model, tmp_path):
    rows = _eval_rows()
    res = evaluate_model(forced_model, rows, _cfg(), name="forced", out_dir=tmp_path, use_ray=False)
    assert res.n == len(rows)
    assert all(r["generated"] == FORCED for r in res.per_sample), [r["generated"] for r in res.per_sample]
    correct = {r["sample_id"]: r["correct"] for r in res.per_sample}
    assert correct == {"e0": True, "e1": False, "e2": True, "e3": False, "e4": True, "e5": True, "noref": True}
    assert res.accuracy == pytest.approx(5 / 7)
    assert res.per_sample[1]["predicted"] == "7" and res.per_sample[1]["reference"] == "8"

    expected, count = _manual_loss(forced_model, rows)
    assert res.n_loss_tokens == count
    assert res.loss == pytest.approx(expected, rel=1e-4)
    # Rows whose answer is the forced one are cheap; the others pay for their differing tokens.
    per = {r["sample_id"]: r["nll"] / r["n_tokens"] for r in res.per_sample}
    assert per["noref"] < per["e1"]

    written = read_per_sample(tmp_path / "eval_forced.jsonl")
    assert [w["sample_id"] for w in written] == [r["sample_id"] for r in res.per_sample]
    assert [w["correct"] for w in written] == [r["correct"] for r in res.per_sample]


def test_max_samples_is_a_seeded_subsample_in_file_order(forced_model, tmp_path):
    from wmss_ray.data.splits import seeded_subsample

    rows = _eval_rows()
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r["sample_id"] for r in rows]
    correct = {"e0": True, "e1": False, "e2": True, "e3": False, "e4": True, "e5": True, "noref": True}
    chosen_by_seed = {}
    for seed in range(6):
        cfg = config_from_dict(_cfg(max_samples=4).to_dict(), [f"run.seed={seed}"])
        res = evaluate_model(forced_model, str(path), cfg, name="capped", use_ray=False)
        chosen = [r["sample_id"] for r in res.per_sample]
        assert res.n == 4 and chosen == [ids[i] for i in seeded_subsample(ids, 4, seed)]
        assert chosen == sorted(chosen, key=ids.index)  # file order kept
        assert res.accuracy == pytest.approx(sum(correct[c] for c in chosen) / 4)
        chosen_by_seed[seed] = tuple(chosen)
    assert len(set(chosen_by_seed.values())) > 1  # the seed matters; it is not "the first 4 rows"


def test_evaluate_models_writes_summary(forced_model, tmp_path):
    rows = _eval_rows()[:3]
    results = evaluate_models({"M1": forced_model, "WMSS": forced_model}, rows, _cfg(), tmp_path)
    summary = json.loads((tmp_path / "eval_results.json").read_text())
    assert set(summary["models"]) == {"M1", "WMSS"}
    assert summary["checker"] == "demo" and summary["models"]["M1"]["checker"] == "demo"
    assert summary["eval_set"] == {"name": "test", "source": "3 rows given in memory", "n": 3,
                                   "max_samples": None, "subsample_seed": None}
    for name, res in results.items():
        entry = summary["models"][name]
        assert entry["n"] == 3 and entry["accuracy"] == pytest.approx(res.accuracy)
        assert math.isclose(entry["loss"], res.loss)
        assert len(read_per_sample(entry["per_sample_path"])) == 3


@pytest.mark.integration
def test_ray_data_path_matches_in_process(forced_model, ray_cluster, tmp_path):
    rows = _eval_rows()
    local = evaluate_model(forced_model, rows, _cfg(), name="local", use_ray=False)
    remote = evaluate_model(forced_model, rows, _cfg(num_actors=1), name="ray", use_ray=True)
    assert remote.n == local.n
    for a, b in zip(local.per_sample, remote.per_sample):
        assert (a["sample_id"], a["correct"], a["generated"], a["n_tokens"]) == (
            b["sample_id"], b["correct"], b["generated"], b["n_tokens"])
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    assert remote.accuracy == local.accuracy
    assert remote.loss == pytest.approx(local.loss, rel=1e-5)


def test_rows_read_and_normalised_from_any_schema(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from wmss_ray.stages.evaluate import load_eval_rows

    rows = _eval_rows()[:2]
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    for name in ("e.jsonl.gz", "e.parquet"):
        got = load_eval_rows(str(tmp_path / name), _cfg())
        assert [g["sample_id"] for g in got] == ["e0", "e1"]
        assert got[1]["final_answer"] == "8" and got[1]["prompt_messages"] == _prompt(21)

    cfg = config_from_dict({"data": {"id_column": "uid", "prompt_column": "q", "response_column": "a"}})
    r = load_eval_rows([{"uid": 5, "q": "What is 2+2?", "a": "2+2=4\n#### 4"}], cfg)
    assert r == [{"sample_id": "5", "prompt_messages": [{"role": "user", "content": "What is 2+2?"}],
                  "answer": "2+2=4\n#### 4", "final_answer": "4"}]
    with pytest.raises(ValueError, match="no assistant"):
        load_eval_rows([{"sample_id": "x", "messages": [{"role": "user", "content": "hi"}]}], _cfg())


def test_eval_ids_and_bad_rows_follow_the_corpus_rules(tmp_path):
    """No id column: ``<file>:<line>`` as for the training corpus; bad rows per data.on_bad_row."""
    from wmss_ray.data.rejects import CorpusError
    from wmss_ray.stages.evaluate import load_eval_rows

    good = _eval_rows()[:2]
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n")
    plain = config_from_dict({"data": {"max_seq_len": 64}})
    with pytest.raises(CorpusError, match=r"eval.jsonl.*3|eval.jsonl.*2"):
        load_eval_rows(str(path), plain)
    skip = config_from_dict({"data": {"max_seq_len": 64, "on_bad_row": "skip"}})
    got = load_eval_rows(str(path), skip)
    assert [g["sample_id"] for g in got] == ["eval.jsonl:1", "eval.jsonl:3"]


def test_evaluate_models_reads_the_eval_file_once(forced_model, tmp_path, monkeypatch):
    import wmss_ray.stages.evaluate as ev

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _eval_rows()[:2]))
    opened = []
    real = ev.open_corpus
    monkeypatch.setattr(ev, "open_corpus", lambda *a, **k: opened.append(a) or real(*a, **k))
    results = ev.evaluate_models({"A": forced_model, "B": forced_model}, str(path), _cfg(), tmp_path / "out")
    assert len(opened) == 1 and [r.n for r in results.values()] == [2, 2]


@pytest.mark.gpu
def test_gpu_evaluator_generates_in_bf16(forced_model):
    """models.dtype auto -> bf16 on CUDA; the memorised answer survives bf16 greedy decoding."""
    from wmss_ray.stages.evaluate import Evaluator, load_eval_rows

    ev = Evaluator(forced_model, max_new_tokens=10, device="cuda")
    assert ev.model.dtype == torch.bfloat16 and ev.model.device.type == "cuda"
    out = ev(load_eval_rows(_eval_rows(), _cfg()))
    assert [o["generated"] for o in out] == [FORCED] * len(out)
    assert all(o["nll"] is not None and o["n_tokens"] > 0 for o in out)


def test_a_prompt_without_room_for_the_answer_is_rejected_and_counted(forced_model, tmp_path):
    """rows in = rows generated from + rows rejected (with the reason), the same rule on both engines:
    the prompt plus max_new_tokens must fit the model's context (128 positions here)."""
    rows = _eval_rows()
    long_prompt = [{"role": "user", "content": " ".join(["seven"] * 150)}]
    rows.append({"sample_id": "long", "messages": long_prompt + [{"role": "assistant", "content": "#### 7"}]})
    res = evaluate_model(forced_model, rows, _cfg(), name="forced", out_dir=tmp_path, use_ray=False)
    by_id = {r["sample_id"]: r for r in res.per_sample}
    assert res.n == len(rows) and res.n_rejected == 1
    assert by_id["long"]["reject_reason"] == "prompt_too_long" and by_id["long"]["correct"] is False
    assert by_id["long"]["generated"] == ""
    assert [r["reject_reason"] for r in res.per_sample if r["sample_id"] != "long"] == [None] * (len(rows) - 1)
    assert res.accuracy == pytest.approx(5 / 8)
    assert res.engine == "hf"


def test_sampled_completions_give_avg_and_pass_at_k(forced_model, tmp_path):
    from wmss_ray.stages.stats import pass_at_k

    cfg = _cfg(samples=3, temperature=0.7, top_p=1.0, sampling_seed=11)
    res = evaluate_model(forced_model, _eval_rows(), cfg, name="forced", out_dir=tmp_path, use_ray=False)
    assert res.sampling == {"samples": 3, "temperature": 0.7, "top_p": 1.0, "seed": 11}
    assert all(len(r["sampled"]) == 3 and len(r["sampled_correct"]) == 3 for r in res.per_sample)
    counts = [sum(r["sampled_correct"]) for r in res.per_sample]
    assert res.avg_at_k == pytest.approx(sum(c / 3 for c in counts) / len(counts))
    assert res.pass_at_k == pytest.approx(sum(pass_at_k(3, c, 3) for c in counts) / len(counts))
    # The memorised answer is sampled too: right exactly where the greedy one is right.
    assert [c > 0 for c in counts] == [r["correct"] for r in res.per_sample]
    # calibration of the greedy answer: its confidence is the share of samples giving the same answer
    from wmss_ray.stages.checkers import checker_from_config
    from wmss_ray.stages.evaluate import answer_confidence
    from wmss_ray.stages.stats import calibration

    checker = checker_from_config(cfg)
    for r in res.per_sample:
        same = sum(checker.extract(t) is not None and r["predicted"] is not None
                   and checker.equivalent(checker.extract(t), r["predicted"]) for t in r["sampled"])
        assert r["confidence"] == (same / 3 if r["predicted"] is not None else 0.0)
    cal = calibration([r["confidence"] for r in res.per_sample], [r["correct"] for r in res.per_sample])
    assert (res.brier, res.ece) == (cal["brier"], cal["ece"]) and 0 <= res.brier <= 1
    assert answer_confidence(None, ["7"], checker) == 0.0 and answer_confidence("7", [], checker) == 0.0
    again = evaluate_model(forced_model, _eval_rows(), cfg, name="forced", use_ray=False)
    assert [r["sampled"] for r in again.per_sample] == [r["sampled"] for r in res.per_sample]
    written = read_per_sample(tmp_path / "eval_forced.jsonl")
    assert [w["sampled_correct"] for w in written] == [r["sampled_correct"] for r in res.per_sample]


def test_engine_choice(monkeypatch):
    from wmss_ray.models import vllm_engine
    from wmss_ray.models.vllm_engine import EngineError
    from wmss_ray.stages.evaluator import resolve_engine

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    auto = _cfg(vllm={"cpu_min_rows": 100})
    assert resolve_engine(auto, 99, on_gpu=False) == "hf"
    assert resolve_engine(auto, 100, on_gpu=False) == "vllm"
    assert resolve_engine(auto, 1, on_gpu=True) == "vllm"
    assert resolve_engine(_cfg(engine="hf"), 10**6, on_gpu=True) == "hf"
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    assert resolve_engine(auto, 10**6, on_gpu=True) == "hf"
    with pytest.raises(EngineError, match="evaluation.engine: hf"):
        resolve_engine(_cfg(engine="vllm"), 10, on_gpu=False)


def test_vllm_settings_that_cannot_be_honoured_fail_at_config_load():
    from wmss_ray.config.schema import ConfigError

    with pytest.raises((ConfigError, ValueError), match="tensor_parallel_size"):
        _cfg(engine="vllm", gpus_per_actor=1, vllm={"tensor_parallel_size": 2})
    with pytest.raises((ConfigError, ValueError), match="gpu_memory_utilization"):
        _cfg(engine="vllm", gpus_per_actor=0.5, vllm={"gpu_memory_utilization": 0.9})
    with pytest.raises((ConfigError, ValueError), match="temperature"):
        _cfg(samples=2, temperature=0)
    assert _cfg(engine="vllm", gpus_per_actor=2, vllm={"tensor_parallel_size": 2}).evaluation.vllm.tensor_parallel_size == 2
