"""The storage helpers (``wmss_ray.storage``) on the local filesystem and through file:// URIs."""

from __future__ import annotations

import os

import pytest

from wmss_ray import storage


def test_write_list_and_reset_local_and_file_uri(tmp_path):
    for base in (str(tmp_path / "plain"), "file://" + str(tmp_path / "uri")):
        storage.write_text(storage.join(base, "a", "x.jsonl"), "1\n")
        storage.write_text(storage.join(base, "b.jsonl"), "2\n")
        storage.write_text(storage.join(base, "c.txt"), "3\n")
        got = storage.list_files(base, ".jsonl")
        assert got == [storage.join(base, "a", "x.jsonl"), storage.join(base, "b.jsonl")]
        fs, path = storage.resolve_fs(got[1])
        with fs.open_input_stream(path) as f:
            assert f.read() == b"2\n"
        assert not any(n.endswith(".tmp") for n in storage.list_files(base, ""))
        storage.reset_dir(base)
        assert storage.list_files(base, "") == []


def test_join_keeps_a_uri_scheme():
    assert storage.join("s3://b/x", "y", "z") == "s3://b/x/y/z"
    assert storage.is_uri("gs://b") and not storage.is_uri("/tmp/x")


def test_local_dir_is_absolute_and_refuses_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.local_dir("runs/r") == os.path.realpath(tmp_path / "runs" / "r")
    with pytest.raises(ValueError, match="s3://b/runs: run directories must be local"):
        storage.local_dir("s3://b/runs")
