"""The Ray Data scoring path equals a single-process loop; scores.parquet, manifest, curriculum."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss_ray.data.chat_tokens import tokenize_example
from wmss_ray.data.corpus import iter_corpus, open_corpus

from .conftest import N_ROWS, tiny_cfg


def _assert_matches_reference(scores: pa.Table, reference: dict) -> None:
    assert scores.num_rows == len(reference) == N_ROWS
    ids = scores["sample_id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # sorted, one row per sample
    ref = np.array([reference[i] for i in ids])  # [N, 3]: h_weak, h_strong, n
    np.testing.assert_allclose(scores["h_weak"].to_numpy(), ref[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores["h_strong"].to_numpy(), ref[:, 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores["dh"].to_numpy(), ref[:, 1] - ref[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(scores["n_answer_tokens"].to_numpy(), ref[:, 2].astype(int))


@pytest.mark.integration
def test_ray_tokenisation_equals_plain(tiny_world, tokenized_world):
    cfg = tiny_world.cfg
    plain = {}
    for rec in iter_corpus(open_corpus(tiny_world.corpus, cfg.data), cfg.data):
        plain[rec["sample_id"]] = tokenize_example(tiny_world.tok, rec["prompt_messages"], rec["answer"],
                                                   cfg.data.max_seq_len)
    got = pq.read_table(tokenized_world.tokenized_path).to_pylist()
    assert len(got) == len(plain) == N_ROWS
    for r in got:
        assert r["input_ids"] == plain[r["sample_id"]]["input_ids"]
        assert r["labels"] == plain[r["sample_id"]]["labels"]
    assert tokenized_world.counts == {"rows_in": N_ROWS, "rows_ok": N_ROWS, "rows_validation": 0, "rows_truncated": 0,
                                      "rows_rejected": 0, "rejected_by_reason": {}}


def _score(tiny_world, tokenized_world, out: str, actors: int, batch: int):
    """``(result, progress counts seen)`` of one Ray scoring run."""
    from wmss_ray.stages.score import score_tokenized

    cfg = tiny_cfg(f"scoring.num_actors={actors}", f"scoring.batch_size={batch}")
    seen: list[int] = []
    res = score_tokenized(cfg, tiny_world.weak, tiny_world.strong, tokenized_world.tokenized_path, out,
                          progress_callback=seen.append)
    return res, seen


@pytest.fixture(scope="module")
def scored_2x3(tiny_world, tokenized_world, tmp_path_factory):
    """2 actors in batches of 3: checked against the loop and as the first of two runs below."""
    return _score(tiny_world, tokenized_world, str(tmp_path_factory.mktemp("scored_2x3")), 2, 3)


def _assert_scored_like_the_loop(res, seen: list[int], reference: dict, actors: int) -> None:
    """Scores equal to the single-process loop, progress reported up to every row, manifest."""
    scores = pq.read_table(res.scores_path)
    # no curriculum weights: they depend on curriculum.*, scores do not (the curriculum phase writes them)
    assert scores.column_names == ["sample_id", "h_weak", "h_strong", "dh", "n_answer_tokens"]
    _assert_matches_reference(scores, reference)
    assert seen[-1] == N_ROWS and seen == sorted(seen)
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["counts"]["rows_scored"] == N_ROWS and manifest["scoring"]["num_actors"] == actors


@pytest.mark.integration
def test_ray_scores_equal_single_process_loop(reference_scores, scored_2x3):
    """2 actors in batches of 3 (1 actor in batches of 8: the end-to-end test below)."""
    _assert_scored_like_the_loop(*scored_2x3, reference_scores, actors=2)


@pytest.mark.integration
def test_ray_scores_are_bit_identical_run_to_run(tiny_world, tokenized_world, scored_2x3, tmp_path):
    """Same models, same tokenised corpus, 2 actors in batches of 3: the same scores to the last
    bit on every run (each sample is scored in the same padded batch), so the same seed gives
    the same curriculum weights."""
    again, _ = _score(tiny_world, tokenized_world, str(tmp_path), 2, 3)
    first = scored_2x3[0]
    assert again.scores_path != first.scores_path
    assert pq.read_table(first.scores_path).equals(pq.read_table(again.scores_path))


@pytest.mark.integration
def test_tokenize_then_score_end_to_end_counts_and_outputs(tiny_world, reference_scores, tmp_path):
    """The pipeline's tokenize and score phases on a corpus with bad rows: every row accounted for;
    one scoring actor in batches of 8 gives the single-process loop's scores (2 actors in batches
    of 3: ``test_ray_scores_equal_single_process_loop``)."""
    from wmss_ray.stages.score import score_tokenized
    from wmss_ray.stages.tokenize import tokenize_corpus

    corpus = tmp_path / "train.jsonl"
    shutil.copy(tiny_world.corpus, corpus)
    with corpus.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "q"}]}\n{not json\n')
    cfg = tiny_cfg("data.on_bad_row=skip", "scoring.num_actors=1", "scoring.batch_size=8")
    out = str(tmp_path / "out")
    tok = tokenize_corpus(cfg, tiny_world.strong, str(corpus), out)
    seen: list[int] = []
    res = score_tokenized(cfg, tiny_world.weak, tiny_world.strong, tok.tokenized_path, out,
                          progress_callback=seen.append)
    assert tok.counts["rows_in"] == N_ROWS + 2
    assert res.counts["rows_scored"] == N_ROWS and tok.counts["rows_rejected"] == 2
    assert tok.counts["rejected_by_reason"] == {"malformed_json": 1, "no_answer": 1}
    assert tok.counts["rows_in"] == res.counts["rows_scored"] + tok.counts["rows_rejected"]
    _assert_scored_like_the_loop(res, seen, reference_scores, actors=1)
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["counts"] == res.counts
    assert json.loads(Path(tok.manifest_path).read_text())["corpus"] == str(corpus)
    assert manifest["models"] == {"weak": tiny_world.weak, "strong": tiny_world.strong}
    assert manifest["config_hash"] == cfg.config_hash()
    assert pq.read_table(tok.tokenized_path).num_rows == N_ROWS
    assert len(Path(tok.rejects_path).read_text().splitlines()) == 2
    _assert_fused_equals_two_executions(cfg, tiny_world, str(corpus), tok, res, tmp_path)


def _assert_fused_equals_two_executions(cfg, tiny_world, corpus: str, tok, res, tmp_path) -> None:
    """``tokenize_and_score`` (one execution, one actor pool) writes the two executions' outputs:
    the same tokenised rows, rejects and counts, and the scores of a plain loop over the corpus in
    batches of ``scoring.batch_size`` consecutive rows (their training rows), to the last bit."""
    from wmss_ray.stages.score import tokenize_and_score
    from wmss_ray.stages.scorer import EntropyScorer

    out = str(tmp_path / "fused")
    tok2, res2 = tokenize_and_score(cfg, tiny_world.strong, corpus, out, tiny_world.weak, tiny_world.strong, out)
    assert tok2.counts == tok.counts
    assert tok2.counts["rows_in"] == res2.counts["rows_scored"] + tok2.counts["rows_rejected"]
    read = lambda d: pq.read_table(sorted(Path(d).glob("*.parquet")))  # noqa: E731  (parts in order)
    old_dir = Path(tok.tokenized_path).parent
    for sub in ("tokenized", "_tokenize_index"):
        assert read(Path(out) / sub).drop_columns(["part"] if sub[0] == "_" else []).equals(
            read(old_dir / sub).drop_columns(["part"] if sub[0] == "_" else []))
    assert Path(tok2.rejects_path).read_text() == Path(tok.rejects_path).read_text()
    assert not list((Path(out) / "_extra_parts").iterdir())  # the side table is consumed
    assert json.loads(Path(res2.manifest_path).read_text())["fused_with_tokenize"] is True
    # the plain loop: corpus rows in blocks of batch_size (JSONL rows = lines, 1-based), the kept rows of each
    rows = read(Path(out) / "tokenized").to_pylist()
    index = read(Path(out) / "_tokenize_index").to_pylist()
    scorer, bs, plain = EntropyScorer(tiny_world.weak, tiny_world.strong), cfg.scoring.batch_size, {}
    for block in sorted({(i["source_row"] - 1) // bs for i in index}):
        batch = [r for r, i in zip(rows, index) if (i["source_row"] - 1) // bs == block]
        s = scorer.score_rows([r["input_ids"] for r in batch], [r["labels"] for r in batch])
        plain.update({r["sample_id"]: (s["h_weak"][k], s["h_strong"][k], s["dh"][k], s["n_answer_tokens"][k])
                      for k, r in enumerate(batch)})
    fused = pq.read_table(res2.scores_path)
    assert fused.schema.equals(pq.read_table(res.scores_path).schema)
    assert [tuple(plain[i]) for i in fused["sample_id"].to_pylist()] == list(zip(
        *(fused[c].to_pylist() for c in ("h_weak", "h_strong", "dh", "n_answer_tokens"))))
    _assert_matches_reference(fused, {k: (v[0], v[1], v[3]) for k, v in plain.items()})
    old = pq.read_table(res.scores_path)
    assert fused["sample_id"].equals(old["sample_id"])
    np.testing.assert_allclose(fused["h_weak"].to_numpy(), old["h_weak"].to_numpy(), atol=1e-5, rtol=0)


@pytest.mark.integration
def test_pipeline_with_m1_given_scores_iteration_1_while_tokenising(tiny_world, tmp_path):
    """``models.strong`` given (no SFT): the tokenize phase runs ``tokenize_and_score`` and score_1
    reuses its scores (training rows only: the validation split is tokenised, not scored); a
    scoring setting changed afterwards makes score_1 score again."""
    from wmss_ray.pipeline import run_pipeline

    cfg = tiny_cfg("models.demo=false", f"models.base={tiny_world.weak}", f"models.strong={tiny_world.strong}",
                   f"data.train={tiny_world.corpus}", f"run.storage={tmp_path}", "scoring.batch_size=16",
                   "data.validation_fraction=0.2")
    out = run_pipeline(cfg, until="score_1")
    run = Path(cfg.run_dir())
    assert out["tokenize"]["scores_1"] == str(run / "tokenize" / "score_1" / "scores.parquet")
    reused = json.loads((run / "score_1" / "scoring_manifest.json").read_text())
    assert reused["copied_from"] == out["tokenize"]["scores_1"] and reused["fused_with_tokenize"] is True
    assert pq.read_table(out["score_1"]["scores"]).equals(pq.read_table(out["tokenize"]["scores_1"]))
    counts = json.loads((run / "tokenize" / "manifest.json").read_text())["counts"]
    assert 0 < counts["rows_validation"] < N_ROWS and counts["rows_ok"] + counts["rows_validation"] == N_ROWS
    assert pq.read_table(out["score_1"]["scores"])["sample_id"].to_pylist() == sorted(
        pq.read_table(out["tokenize"]["tokenized"])["sample_id"].to_pylist())
    cfg2 = cfg.model_copy(deep=True)
    cfg2.scoring.chunk_size = 7  # not in the tokenize phase's inputs: it is skipped, score_1 is not
    out2 = run_pipeline(cfg2, until="score_1")
    again = json.loads((Path(cfg2.run_dir()) / "score_1" / "scoring_manifest.json").read_text())
    assert "copied_from" not in again and again["scoring"]["chunk_size"] == 7
    assert pq.read_table(out2["score_1"]["scores"]).num_rows == counts["rows_ok"]


def test_incompatible_pair_fails_before_any_work(tiny_world, tokenized_world, tmp_path):
    from wmss_ray.models.loading import IncompatibleModelsError
    from wmss_ray.stages.score import score_tokenized

    other = Path(shutil.copytree(tiny_world.weak, tmp_path / "other"))
    cfg_json = json.loads((other / "config.json").read_text())
    cfg_json["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(IncompatibleModelsError, match="vocab_size"):
        score_tokenized(tiny_cfg(), str(other), tiny_world.strong, tokenized_world.tokenized_path,
                        str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
