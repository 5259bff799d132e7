"""Corpus reading: formats, schemas, sample ids, and bad rows (counted, never lost).

Plain (Ray-free) tests cover every bad-row kind in every format; a few integration tests run the
Ray Data path (``tokenize_corpus``) for both policies and every format.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss_ray.config.loading import load_config
from wmss_ray.data import rejects as R
from wmss_ray.data.corpus import discover_corpus, iter_corpus, normalize_row, open_corpus
from wmss_ray.models.tokenizer import build_demo_tokenizer


def _chat(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


GOOD = [_chat(f"What is {i} + 1?", f"{i}+1={i + 1}\n#### {i + 1}") for i in range(6)]
LONG = _chat("x" * 300, "#### 1")  # > max_seq_len 96: too_long under truncation=reject

# (raw line, expected reason or None) for a JSONL corpus; line numbers are 1-based.
JSONL_CASES: list[tuple[bytes, str | None]] = [
    (json.dumps(GOOD[0]).encode(), None),
    (b'{"messages": [', R.MALFORMED_JSON),
    (b'{"messages": "caf\xe9"}', R.INVALID_UTF8),
    (b"[1, 2]", R.WRONG_TYPE),
    (json.dumps({"text": "hi"}).encode(), R.MISSING_FIELD),
    (json.dumps({"messages": []}).encode(), R.EMPTY_FIELD),
    (json.dumps({"messages": "hello"}).encode(), R.WRONG_TYPE),
    (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}).encode(), R.WRONG_TYPE),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(), R.NO_ANSWER),
    (json.dumps(_chat("q", "   ")).encode(), R.EMPTY_FIELD),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}).encode(), R.EMPTY_PROMPT),
    (b"   ", None),  # blank line: not a row
    (json.dumps(GOOD[1]).encode(), None),
    (json.dumps(LONG).encode(), None),  # good under left truncation; too_long under reject
    (json.dumps({"messages": [{"role": "system", "content": "be brief"}, *GOOD[2]["messages"]]}).encode(), None),
]
N_ROWS = sum(1 for raw, _ in JSONL_CASES if raw.strip())


def _cfg(*overrides: str):
    return load_config(None, ["data.max_seq_len=96", *overrides])


def _write_jsonl(path: Path, cases=JSONL_CASES, gz: bool = False) -> Path:
    blob = b"\n".join(raw for raw, _ in cases) + b"\n"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def _reasons(records) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r["reject_reason"]:
            out[r["reject_reason"]] = out.get(r["reject_reason"], 0) + 1
    return out


def _expected_reasons(cases=JSONL_CASES) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, reason in cases:
        if reason:
            out[reason] = out.get(reason, 0) + 1
    return out


# ----------------------------------------------------------------------------- plain


def test_normalize_chat_and_prompt_response():
    cfg = _cfg()
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "final", "name": "bot"}, {"role": "user", "content": "thanks"}]
    prompt, answer = normalize_row({"messages": msgs}, "messages", cfg.data)
    assert answer == "final"  # the LAST assistant message; trailing user turn dropped
    assert prompt == [{"role": m["role"], "content": m["content"]} for m in msgs[:4]]
    prompt, answer = normalize_row({"prompt": "q", "response": "a"}, "prompt_response", cfg.data)
    assert (prompt, answer) == ([{"role": "user", "content": "q"}], "a")


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_every_bad_kind_is_kept_with_its_line(tmp_path, gz):
    path = _write_jsonl(tmp_path / ("train.jsonl.gz" if gz else "train.jsonl"), gz=gz)
    cfg = _cfg("data.on_bad_row=skip")
    recs = list(iter_corpus(open_corpus(str(path), cfg.data), cfg.data))
    assert len(recs) == N_ROWS  # every non-blank line is one record, good or bad
    assert _reasons(recs) == _expected_reasons()
    by_line = {r["source_row"]: r for r in recs}
    for line_no, (raw, reason) in enumerate(JSONL_CASES, start=1):
        if raw.strip():
            assert by_line[line_no]["reject_reason"] == reason, (line_no, raw)
    name = path.name
    assert by_line[1]["sample_id"] == f"{name}:1" and by_line[1]["answer"] == GOOD[0]["messages"][1]["content"]
    assert by_line[15]["prompt_messages"][0] == {"role": "system", "content": "be brief"}


def test_error_policy_names_file_line_and_reason(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl")
    cfg = _cfg()  # on_bad_row: error is the default
    with pytest.raises(R.CorpusError, match=r"train\.jsonl line 2: malformed_json"):
        list(iter_corpus(open_corpus(str(path), cfg.data), cfg.data))


def test_id_column_missing_and_wrong(tmp_path):
    rows = [dict(GOOD[0], uid="a"), dict(GOOD[1]), dict(GOOD[2], uid=""), dict(GOOD[3], uid=7), dict(GOOD[4], uid=[1])]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg("data.on_bad_row=skip", "data.id_column=uid")
    recs = list(iter_corpus(open_corpus(str(path), cfg.data), cfg.data))
    assert [r["sample_id"] for r in recs] == ["a", "t.jsonl:2", "t.jsonl:3", "7", "t.jsonl:5"]
    assert [r["reject_reason"] for r in recs] == [None, R.MISSING_FIELD, R.EMPTY_FIELD, None, R.WRONG_TYPE]


def _parquet_rows():
    """Rows a typed Parquet column can hold, with the expected reason (row index is 0-based)."""
    m = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731
    return [
        ({"messages": GOOD[0]["messages"]}, None),
        ({"messages": None}, R.MISSING_FIELD),
        ({"messages": []}, R.EMPTY_FIELD),
        ({"messages": m(("user", "q"))}, R.NO_ANSWER),
        ({"messages": m(("user", "q"), ("assistant", ""))}, R.EMPTY_FIELD),
        ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}, R.MISSING_FIELD),
        ({"messages": GOOD[1]["messages"]}, None),
    ]


def _write_parquet(path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist([r for r, _ in _parquet_rows()]), path, row_group_size=3)
    return path


def _write_hf(path: Path) -> Path:
    from datasets import Dataset

    Dataset.from_list([r for r, _ in _parquet_rows()]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("writer", [_write_parquet, _write_hf])
def test_parquet_and_hf_rows_and_reasons(tmp_path, writer):
    path = writer(tmp_path / ("train.parquet" if writer is _write_parquet else "hf_train"))
    cfg = _cfg("data.on_bad_row=skip")
    corpus = open_corpus(str(path), cfg.data)
    assert corpus.format == ("parquet" if writer is _write_parquet else "hf") and corpus.schema == "messages"
    recs = list(iter_corpus(corpus, cfg.data))
    assert [r["reject_reason"] for r in recs] == [reason for _, reason in _parquet_rows()]
    assert [r["source_row"] for r in recs] == list(range(len(recs)))  # 0-based row index
    cfg_err = _cfg()
    with pytest.raises(R.CorpusError, match=r"row 1: missing_field"):
        list(iter_corpus(corpus, cfg_err.data))


def test_discovery_errors_and_shards(tmp_path):
    (tmp_path / "a").mkdir()
    _write_jsonl(tmp_path / "a" / "p0.jsonl", JSONL_CASES[:1])
    _write_jsonl(tmp_path / "a" / "p1.jsonl", JSONL_CASES[:1])
    (tmp_path / "a" / "_ignored.jsonl").write_text("not json\n")
    c = discover_corpus(str(tmp_path / "a"))
    assert c.format == "jsonl" and [Path(f).name for f in c.files] == ["p0.jsonl", "p1.jsonl"]
    cfg = _cfg()
    ids = [r["sample_id"] for r in iter_corpus(open_corpus("file://" + str(tmp_path / "a"), cfg.data), cfg.data)]
    assert ids == ["p0.jsonl:1", "p1.jsonl:1"]  # URI form reads the same files
    _write_parquet(tmp_path / "a" / "x.parquet")
    with pytest.raises(R.CorpusError, match="mixed file formats"):
        discover_corpus(str(tmp_path / "a"))
    with pytest.raises(R.CorpusError, match="not found"):
        discover_corpus(str(tmp_path / "nope.jsonl"))
    (tmp_path / "odd.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(R.CorpusError, match="cannot tell the row schema"):
        open_corpus(str(tmp_path / "odd.jsonl"), cfg.data)


# ----------------------------------------------------------------------------- Ray Data


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_demo_tokenizer(d)
    return str(d)


def _read_rejects(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.integration
def test_ray_jsonl_skip_counts_rejects_and_tokenized(ray_cluster, tmp_path, tok_dir):
    from wmss_ray.stages.tokenize import tokenize_corpus

    cases = JSONL_CASES + [(json.dumps(dict(GOOD[0])).encode(), None)]  # same content, new line id
    path = _write_jsonl(tmp_path / "train.jsonl", cases)
    cfg = _cfg("data.on_bad_row=skip", "data.truncation=reject", "scoring.batch_size=4")
    res = tokenize_corpus(cfg, tok_dir, str(path), str(tmp_path / "out"))
    expected = _expected_reasons(cases) | {R.TOO_LONG: 1}
    n_in = N_ROWS + 1
    assert res.counts == {"rows_in": n_in, "rows_ok": n_in - sum(expected.values()), "rows_validation": 0,
                          "rows_truncated": 0, "rows_rejected": sum(expected.values()),
                          "rejected_by_reason": dict(sorted(expected.items()))}
    rej = _read_rejects(res.rejects_path)
    assert len(rej) == sum(expected.values())
    assert {"sample_id": "train.jsonl:2", "file": str(path), "row": 2, "reason": R.MALFORMED_JSON} == {
        k: rej[0][k] for k in ("sample_id", "file", "row", "reason")}
    assert [r["row"] for r in rej] == sorted(r["row"] for r in rej)
    tok = pq.read_table(res.tokenized_path)
    assert tok.column_names == ["sample_id", "input_ids", "labels"]
    assert sorted(tok["sample_id"].to_pylist()) == sorted(["train.jsonl:1", "train.jsonl:13", "train.jsonl:15", "train.jsonl:16"])
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["counts"] == res.counts and manifest["schema"] == "messages"


@pytest.mark.integration
def test_ray_error_policy_read_and_tokenize_stage(ray_cluster, tmp_path, tok_dir):
    from wmss_ray.stages.tokenize import tokenize_corpus

    path = _write_jsonl(tmp_path / "train.jsonl")
    with pytest.raises(R.CorpusError, match=r"train\.jsonl line 2: malformed_json"):
        tokenize_corpus(_cfg(), tok_dir, str(path), str(tmp_path / "o1"))
    good = [c for c in JSONL_CASES if c[1] is None and c[0].strip()]
    path2 = _write_jsonl(tmp_path / "long.jsonl", good)
    with pytest.raises(R.CorpusError, match=r"long\.jsonl line 3: too_long"):
        tokenize_corpus(_cfg("data.truncation=reject"), tok_dir, str(path2), str(tmp_path / "o2"))


@pytest.mark.integration
def test_ray_duplicate_ids_both_policies(ray_cluster, tmp_path, tok_dir):
    from wmss_ray.stages.tokenize import tokenize_corpus

    rows = [dict(GOOD[0], uid="a"), dict(GOOD[1], uid="b"), dict(GOOD[2], uid="a"), dict(GOOD[3])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg("data.on_bad_row=skip", "data.id_column=uid")
    res = tokenize_corpus(cfg, tok_dir, str(path), str(tmp_path / "out"))
    assert res.counts["rejected_by_reason"] == {R.DUPLICATE_SAMPLE_ID: 1, R.MISSING_FIELD: 1}
    assert res.counts["rows_ok"] == 2 and res.counts["rows_in"] == 4
    assert sorted(pq.read_table(res.tokenized_path)["sample_id"].to_pylist()) == ["a", "b"]
    dup = [r for r in _read_rejects(res.rejects_path) if r["reason"] == R.DUPLICATE_SAMPLE_ID][0]
    assert dup["row"] == 3 and "d.jsonl line 1" in dup["detail"]  # the later line is the reject
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))  # without the id-less row
    with pytest.raises(R.CorpusError, match=r"d\.jsonl line 3: duplicate_sample_id: .*already at .*d\.jsonl line 1 "):
        tokenize_corpus(_cfg("data.id_column=uid"), tok_dir, str(path), str(tmp_path / "o2"))


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["parquet", "hf", "gz_prompt_response"])
def test_ray_formats_skip(ray_cluster, tmp_path, tok_dir, kind):
    from wmss_ray.stages.tokenize import tokenize_corpus

    cfg = _cfg("data.on_bad_row=skip", "scoring.batch_size=2")
    if kind == "gz_prompt_response":
        rows = [{"q": "1+1?", "r": "2"}, {"q": "2+2?", "r": ""}, {"q": 3, "r": "x"}, {"q": "4+4?", "r": "8"}]
        path = tmp_path / "pr.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
        cfg = _cfg("data.on_bad_row=skip", "data.prompt_column=q", "data.response_column=r")
        expected = {R.EMPTY_FIELD: 1, R.WRONG_TYPE: 1}
        n = 4
    else:
        path = (_write_parquet if kind == "parquet" else _write_hf)(tmp_path / ("train.parquet" if kind == "parquet" else "hf_train"))
        expected = _expected_reasons(_parquet_rows())
        n = len(_parquet_rows())
    res = tokenize_corpus(cfg, tok_dir, str(path), str(tmp_path / "out"))
    assert res.counts["rows_in"] == n
    assert res.counts["rejected_by_reason"] == dict(sorted(expected.items()))
    assert res.counts["rows_ok"] == n - sum(expected.values())
    assert pq.read_table(res.tokenized_path).num_rows == res.counts["rows_ok"]
    assert len(_read_rejects(res.rejects_path)) == sum(expected.values())


def test_tokenized_parts_are_written_in_row_groups_of_a_few_mb(tmp_path):
    """Training ranks read tokenised rows one row group at a time: groups must be small."""
    from wmss_ray.stages.tokenize_io import ROW_GROUP_BYTES, write_part

    ids = np.arange(2000 * 1024, dtype=np.int64).reshape(2000, 1024)
    table = pa.table({"sample_id": [f"s{i}" for i in range(2000)], "input_ids": list(ids), "labels": list(ids)})
    write_part(table, str(tmp_path / "part.parquet"))
    md = pq.read_metadata(tmp_path / "part.parquet")
    assert md.num_rows == 2000 and md.num_row_groups >= table.nbytes // ROW_GROUP_BYTES
    per_row = table.nbytes / 2000
    assert all(md.row_group(g).num_rows * per_row <= 1.01 * ROW_GROUP_BYTES for g in range(md.num_row_groups))


@pytest.mark.integration
def test_ray_validation_split_truncation_counts_and_prompt_cut_away(ray_cluster, tmp_path, tok_dir):
    """data.validation_fraction carves rows by sample_id hash, disjoint from training; truncated
    rows are counted; a row whose answer leaves no room for its prompt is rejected, not trained on."""
    from wmss_ray.data.splits import in_validation
    from wmss_ray.stages.tokenize import tokenize_corpus
    from wmss_ray.stages.tokenize_io import read_validation_rows

    rows = [dict(_chat(f"What is {i} + 1?", f"{i}+1={i + 1}\n#### {i + 1}"), uid=f"q{i}", gold=str(i + 1))
            for i in range(40)]
    rows.append(dict(_chat("x" * 300, "#### 1"), uid="long-prompt", gold="1"))  # left-truncated, kept
    rows.append(dict(_chat("What is 1?", "y" * 120), uid="long-answer", gold="1"))  # prompt cut away
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg("data.on_bad_row=skip", "data.id_column=uid", "data.validation_fraction=0.25",
               "data.reference_column=gold", "scoring.batch_size=8")
    res = tokenize_corpus(cfg, tok_dir, str(path), str(tmp_path / "out"))
    expect_val = sorted(r["uid"] for r in rows[:41] if in_validation(r["uid"], 0.25))
    assert 0 < len(expect_val) < 41
    assert res.counts["rejected_by_reason"] == {R.PROMPT_TRUNCATED_AWAY: 1}
    assert res.counts["rows_validation"] == len(expect_val)
    assert res.counts["rows_ok"] == 41 - len(expect_val)
    assert res.counts["rows_truncated"] == 1  # "long-prompt", in whichever split it hashed to
    train_ids = set(pq.read_table(res.tokenized_path)["sample_id"].to_pylist())
    val = read_validation_rows(res.validation_path)
    # The split the tokenising actor carved is the one this process computes from the ids alone:
    # the same corpus gives the same split in any process, on any run (no second run needed).
    assert sorted(r["sample_id"] for r in val) == expect_val and not train_ids & set(expect_val)
    by_id = {r["uid"]: r for r in rows}
    for r in val:  # the validation rows keep what evaluation needs: prompt, answer, reference
        assert r["answer"] == by_id[r["sample_id"]]["messages"][1]["content"]
        assert r["reference"] == by_id[r["sample_id"]]["gold"]
        assert r["prompt_messages"][0]["content"] == by_id[r["sample_id"]]["messages"][0]["content"]
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["counts"] == res.counts and manifest["validation"] == res.validation_path
