"""The file-format helpers (``wmss_ray.io.files``) on the local filesystem and through file:// URIs."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq

from wmss_ray.io import files, storage


def test_jsonl_round_trip_local_and_file_uri(tmp_path):
    rows = [{"a": 1, "s": "é"}, {"a": 2, "x": float("nan")}]
    for base in (str(tmp_path / "plain"), "file://" + str(tmp_path / "uri")):
        uri = storage.join(base, "sub", "rows.jsonl")  # parents created
        files.write_jsonl(uri, rows)
        got = files.read_jsonl(uri)
        assert got[0] == rows[0] and got[1]["a"] == 2 and math.isnan(got[1]["x"])
        assert not storage.list_files(base, ".tmp")
    text = storage.read_text(storage.join(str(tmp_path / "plain"), "sub", "rows.jsonl"))
    assert text.splitlines()[0] == '{"a": 1, "s": "\\u00e9"}' and text.endswith("\n")
    files.write_jsonl(str(tmp_path / "raw.jsonl"), rows[:1], ensure_ascii=False)
    assert (tmp_path / "raw.jsonl").read_text(encoding="utf-8") == '{"a": 1, "s": "é"}\n'


def test_read_jsonl_skips_blank_lines(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert files.read_jsonl(str(tmp_path / "x.jsonl")) == [{"a": 1}, {"a": 2}]


def test_read_metrics_sorts_by_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": NaN}\n{"step": 1, "loss": 1.0}\n')
    got = files.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [m["step"] for m in got] == [1, 2] and math.isnan(got[1]["loss"])


def test_write_parquet_default_and_sized_row_groups(tmp_path):
    table = pa.table({"x": list(range(1000))})
    files.write_parquet(table, "file://" + str(tmp_path / "a.parquet"))
    assert pq.read_table(tmp_path / "a.parquet").equals(table)
    assert pq.read_metadata(tmp_path / "a.parquet").num_row_groups == 1
    files.write_parquet(table, str(tmp_path / "b.parquet"), row_group_bytes=table.nbytes // 10)
    md = pq.read_metadata(tmp_path / "b.parquet")
    assert md.num_rows == 1000 and md.num_row_groups == 10
