"""The storage helpers (``wmss_ray.io.storage``) on the local filesystem and through file:// URIs."""

from __future__ import annotations

import os

import pytest

from wmss_ray.io import storage


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


def test_location_is_absolute_locally_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.location("runs/r") == os.path.realpath(tmp_path / "runs" / "r")
    assert storage.location("s3://b/runs/") == "s3://b/runs"
    with pytest.raises(ValueError, match="'ftp' is not a pyarrow filesystem"):
        storage.location("ftp://h/runs")


def test_redact_drops_user_info_and_query():
    assert storage.redact("s3://KEY:SECRET@b/x?access_key=K&secret_key=S") == "s3://b/x"
    assert storage.redact("/local/p") == "/local/p"
    assert storage.redact("hdfs://user:pw@namenode:8020/runs") == "hdfs://namenode:8020/runs"


def test_staged_dir_writes_locally_in_place(tmp_path):
    with storage.staged_dir(str(tmp_path / "d")) as local:
        assert local == str(tmp_path / "d")
        open(os.path.join(local, "f"), "w").write("x")
    assert (tmp_path / "d" / "f").read_text() == "x"


# ----------------------------------------------------------------------------- a real S3 server


@pytest.fixture()
def s3_base(s3_server, request):
    return f"s3://{s3_server['bucket']}/unit/{request.node.name}"


def test_s3_round_trip_of_text_lists_and_existence(s3_base):
    storage.write_text(storage.join(s3_base, "a", "x.jsonl"), "1\n")
    storage.write_text(storage.join(s3_base, "b.jsonl"), "2\n")
    storage.append_text(storage.join(s3_base, "b.jsonl"), "3\n")
    assert storage.read_text(storage.join(s3_base, "b.jsonl")) == "2\n3\n"
    assert storage.list_files(s3_base, ".jsonl") == [storage.join(s3_base, "a", "x.jsonl"),
                                                     storage.join(s3_base, "b.jsonl")]
    assert storage.exists(storage.join(s3_base, "a", "x.jsonl")) and storage.is_dir(storage.join(s3_base, "a"))
    assert not storage.exists(storage.join(s3_base, "nothing"))
    assert not any(n.endswith(".tmp") for n in storage.list_files(s3_base, ""))
    storage.reset_dir(s3_base)
    assert storage.list_files(s3_base, "") == []


def test_s3_upload_download_and_staged_dir(s3_base, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(bytes(range(256)) * 1000)
    (src / "sub" / "t.json").write_text("{}")
    storage.upload_dir(str(src), storage.join(s3_base, "m"))
    storage.download_dir(storage.join(s3_base, "m"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()
    assert (tmp_path / "back" / "sub" / "t.json").read_text() == "{}"
    with storage.staged_dir(storage.join(s3_base, "staged")) as local:
        staged = local
        open(os.path.join(local, "r.txt"), "w").write("report")
    assert not os.path.exists(staged)  # the temp copy is gone, the store has the file
    assert storage.read_text(storage.join(s3_base, "staged", "r.txt")) == "report"
    with pytest.raises(RuntimeError), storage.staged_dir(storage.join(s3_base, "failed")) as local:
        open(os.path.join(local, "half.txt"), "w").write("x")
        raise RuntimeError("phase failed")
    assert not storage.exists(storage.join(s3_base, "failed", "half.txt"))  # nothing uploaded


def test_a_model_uri_is_cached_once_per_content(s3_base, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    uri = storage.join(s3_base, "model")
    storage.upload_dir(str(src), uri)
    cache = str(tmp_path / "cache")
    first = storage.local_model_dir(uri, cache)
    assert open(os.path.join(first, "config.json")).read() == '{"a": 1}'
    assert storage.local_model_dir(uri, cache) == first  # second call: the same complete copy
    assert sorted(os.listdir(cache)) == [os.path.basename(first)]  # no temp dirs left behind
    (src / "config.json").write_text('{"a": 22}')  # re-exported: a new copy, never the stale one
    storage.upload_dir(str(src), uri)
    second = storage.local_model_dir(uri, cache)
    assert second != first and open(os.path.join(second, "config.json")).read() == '{"a": 22}'
    assert storage.local_model_dir(str(src), cache) == str(src)  # local dirs are used in place
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        storage.local_model_dir(storage.join(s3_base, "missing"), cache)


def test_reachability_probe_passes_and_leaves_nothing(s3_base):
    storage.check_reachable(s3_base)
    assert storage.list_files(s3_base, "") == []


def test_an_unreachable_store_fails_naming_the_uri(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(storage.StorageError) as err:
        storage.check_reachable("s3://nobucket/runs/r")
    msg = str(err.value)
    assert "s3://nobucket/runs/r" in msg and "not reachable" in msg
    assert "topsecretvalue" not in msg and "AKIDSECRETVALUE" not in msg


@pytest.mark.parametrize("where", ["local", "s3"])
def test_copy_dir_replaces_the_target_with_the_source_files(where, s3_base, tmp_path):
    base = str(tmp_path) if where == "local" else s3_base
    src, dst = storage.join(base, "src"), storage.join(base, "dst")
    storage.write_bytes(storage.join(src, "w.bin"), bytes(range(256)) * 100)
    storage.write_text(storage.join(src, "sub", "t.json"), "{}")
    storage.write_text(storage.join(dst, "stale.txt"), "old")  # emptied first
    storage.copy_dir(src, dst)
    assert storage.list_files(dst, "") == [storage.join(dst, "sub", "t.json"), storage.join(dst, "w.bin")]
    assert storage.read_bytes(storage.join(dst, "w.bin")) == bytes(range(256)) * 100
    assert storage.read_text(storage.join(src, "sub", "t.json")) == "{}"  # the source is untouched


@pytest.mark.parametrize("where", ["local", "s3"])
def test_last_modified_is_the_newest_file_anywhere_under_a_directory(where, s3_base, tmp_path):
    import time

    base = str(tmp_path) if where == "local" else s3_base
    d = storage.join(base, "phase")
    assert storage.last_modified(d) is None  # nothing there
    before = time.time() - 2  # the store's clock: S3 times are whole seconds
    storage.write_text(storage.join(d, "manifest.json"), "{}")
    storage.write_text(storage.join(d, "ckpt", "rank0", "state.pt"), "x")
    newest = storage.last_modified(d)
    assert newest is not None and before <= newest <= time.time() + 2
    if where == "local":  # a file deeper down that is newer decides
        os.utime(os.path.join(d, "ckpt", "rank0", "state.pt"), (newest + 50, newest + 50))
        assert storage.last_modified(d) == pytest.approx(newest + 50)
