"""The one storage layer: every phase reads and writes files through these helpers.

Paths are local paths or URIs pyarrow understands (``file://``, ``s3://``, ``gs://``, ``hdfs://``,
``abfs://``); all I/O goes through ``pyarrow.fs`` so Ray tasks on other nodes and the driver
agree on what a path means. ``run.storage`` may be such a URI: manifests, tokenised data,
scores, checkpoints, models and reports are then written there, and nothing of the run stays on
local disk except the model cache (:func:`local_model_dir`).

Credentials and endpoints come only from the standard environment, read by pyarrow itself
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL`` for an S3-compatible server; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS).
Nothing here logs them; :func:`redact` strips user info and query strings from a URI before
it appears in a message.

Layer: below every phase module; imports only pyarrow and the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

import pyarrow.fs as pafs

from wmss_ray.io.errors import UserError

# Schemes pyarrow.fs.FileSystem.from_uri opens (checked at config load, without any network).
SUPPORTED_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
MODEL_CACHE_ENV = "WMSS_MODEL_CACHE"  # default ~/.cache/wmss-ray/models
_COMPLETE = ".wmss_complete"  # marker written last into a cached copy
_fs_cache: dict[str, tuple[pafs.FileSystem, str]] = {}
_fs_lock = threading.Lock()


class StorageError(UserError, OSError):
    """Storage cannot be used; the message names the (redacted) URI and the reason."""


def is_uri(path: str) -> bool:
    """``scheme://...`` (``s3://b/x``, ``file:///x``) rather than a plain local path."""
    return "://" in str(path)


def is_remote(path: str) -> bool:
    """A URI whose files are not on this machine's disk (anything but a plain path or file://)."""
    return is_uri(path) and urllib.parse.urlsplit(str(path)).scheme != "file"


def redact(uri: str) -> str:
    """``uri`` without user info or query string (where pyarrow accepts secrets), for messages."""
    if not is_uri(uri):
        return str(uri)
    p = urllib.parse.urlsplit(str(uri))
    return urllib.parse.urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", ""))


def check_scheme(uri: str) -> str:
    """``uri`` unchanged when it is a plain path or its scheme is one pyarrow opens, else ValueError."""
    if is_uri(uri):
        scheme = urllib.parse.urlsplit(uri).scheme
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"{redact(uri)}: scheme {scheme!r} is not a pyarrow filesystem; "
                             f"use a local path or one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}")
    return uri


def resolve_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI (s3://, gs://, file://).

    One filesystem object per ``scheme://authority`` (building an S3 client costs a round trip).
    """
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    p = urllib.parse.urlsplit(path)
    if p.query or p.scheme == "file":  # options in the query: no sharing
        return pafs.FileSystem.from_uri(path)
    key = f"{p.scheme}://{p.netloc}"
    cache_key = f"{key} {os.environ.get('AWS_ENDPOINT_URL', '')}"  # the endpoint picks the server
    with _fs_lock:
        if cache_key not in _fs_cache:
            fs, base = pafs.FileSystem.from_uri(key + "/")
            if isinstance(fs, pafs.S3FileSystem):
                fs = _s3_small_files_in_one_put(fs)
            _fs_cache[cache_key] = fs, base
        fs, base = _fs_cache[cache_key]
    rest = p.path.lstrip("/")
    return fs, (posixpath.join(base, rest) if rest else base).rstrip("/") or base


def _s3_small_files_in_one_put(fs: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """The same S3 filesystem (region as resolved, endpoint and credentials from the environment)
    with delayed open: a file smaller than one part goes up in a single PutObject instead of a
    multipart upload (3 round trips; and some S3-compatible servers reject tiny multiparts)."""
    return pafs.S3FileSystem(region=fs.region, endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None,
                             allow_delayed_open=True)


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a URI's scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def location(path: str) -> str:
    """Where a run directory is: an absolute local path (symlinks resolved) or the URI as given."""
    return check_scheme(str(path)).rstrip("/") if is_uri(path) else os.path.realpath(str(path))


def make_dir(uri: str) -> None:
    fs, path = resolve_fs(uri)
    fs.create_dir(path, recursive=True)


def exists(uri: str) -> bool:
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def reset_dir(uri: str) -> None:
    """Create ``uri`` as an empty directory (stale parts of a crashed run must not mix in)."""
    fs, path = resolve_fs(uri)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)


def list_entries(uri: str) -> list[str]:
    """Names of the files and folders directly in directory ``uri``, sorted ([] if it is missing)."""
    fs, path = resolve_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def delete_dir(uri: str) -> None:
    fs, path = resolve_fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_file(uri: str) -> bool:
    """Delete the file ``uri`` if it exists; True if there was one."""
    fs, path = resolve_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    fs.delete_file(path)
    return True


@contextlib.contextmanager
def open_input(uri: str) -> Iterator:
    """A binary input stream of the file at ``uri``."""
    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        yield f


@contextlib.contextmanager
def open_output(uri: str) -> Iterator:
    """A binary output stream to ``uri`` (parents created); tmp + move where the fs allows it."""
    fs, path = resolve_fs(uri)
    fs.create_dir(posixpath.dirname(path) or "/", recursive=True)
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        yield f
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str, data: bytes) -> None:
    with open_output(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    """Write a whole small file (manifests, merged rejects); tmp + move where the fs allows."""
    write_bytes(uri, text.encode())


def append_text(uri: str, text: str) -> None:
    """Append to a small log file (read + rewrite on object stores, which cannot append)."""
    if not is_remote(uri):
        fs, path = resolve_fs(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return
    write_text(uri, (read_text(uri) if exists(uri) else "") + text)


def _file_infos(uri: str) -> tuple[str, list[pafs.FileInfo]]:
    fs, path = resolve_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return path, [i for i in infos if i.type == pafs.FileType.File]


def last_modified(uri: str) -> float | None:
    """The newest modification time (Unix seconds) of any file under directory ``uri``; None when
    it holds none (or the store gives no times)."""
    _, infos = _file_infos(uri)
    times = [i.mtime.timestamp() for i in infos if i.mtime is not None]
    return max(times) if times else None


def list_files(uri: str, suffix: str) -> list[str]:
    """Files under directory ``uri`` ending in ``suffix``, sorted, as URIs/paths like ``uri``."""
    path, infos = _file_infos(uri)
    names = sorted(i.path for i in infos if i.path.endswith(suffix))
    return [join(uri, posixpath.relpath(n, path)) for n in names]


def upload_file(local_path: str, uri: str) -> None:
    """Copy one local file to ``uri``."""
    with open(local_path, "rb") as src, open_output(uri) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def upload_dir(local: str, uri: str) -> None:
    """Copy the local directory ``local`` to ``uri`` (emptied first: no stale files mix in)."""
    reset_dir(uri)
    for root, _dirs, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            upload_file(src, join(uri, *os.path.relpath(src, local).split(os.sep)))


def copy_dir(src: str, dst: str) -> None:
    """Copy the files under directory ``src`` to directory ``dst`` (emptied first), both on one
    filesystem: on object storage each file is copied by the server (nothing passes through here)."""
    fs, _ = resolve_fs(src)
    dst_fs, dst_path = resolve_fs(dst)
    reset_dir(dst)
    base, infos = _file_infos(src)
    for info in infos:
        rel = posixpath.relpath(info.path, base)
        target = posixpath.join(dst_path, rel)
        dst_fs.create_dir(posixpath.dirname(target), recursive=True)
        fs.copy_file(info.path, target)


def download_dir(uri: str, local: str, keep: Callable[[str], bool] | None = None) -> None:
    """Copy the files under ``uri`` into the local directory ``local``.

    ``keep``: only the files whose path relative to ``uri`` (``/``-separated) it accepts.
    """
    fs, _ = resolve_fs(uri)
    path, infos = _file_infos(uri)
    for info in infos:
        rel = posixpath.relpath(info.path, path)
        if keep is not None and not keep(rel):
            continue
        dst = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)


@contextlib.contextmanager
def staged_dir(uri: str) -> Iterator[str]:
    """A local directory whose contents end up at ``uri``.

    Local ``uri``: the directory itself. Remote: a temporary directory, uploaded when the block
    ends without error and removed either way (nothing of the run stays on local disk).
    """
    if not is_remote(uri):
        _, path = resolve_fs(uri)
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="wmss-stage-")
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                src = os.path.join(root, name)
                upload_file(src, join(uri, *os.path.relpath(src, tmp).split(os.sep)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_reachable(uri: str) -> None:
    """Fail now, naming ``uri`` and the reason, when the run storage cannot be listed and written.

    Writes and deletes a small probe file under ``uri``; a local path is simply created.
    """
    probe = join(uri, f".wmss_probe_{os.getpid()}_{time.time_ns()}")
    try:
        make_dir(uri)
        resolve_fs(uri)[0].get_file_info(pafs.FileSelector(resolve_fs(uri)[1], allow_not_found=True))
        write_text(probe, "probe\n")
        fs, path = resolve_fs(probe)
        fs.delete_file(path)
    except Exception as err:  # noqa: BLE001 - re-raised with the URI and the reason
        raise StorageError(f"run storage {redact(uri)} is not reachable or not writable: "
                           f"{type(err).__name__}: {err}") from err


def local_model_dir(path: str, cache_root: str | None = None) -> str:
    """A local directory with the files of model directory ``path`` (HF loads local dirs only).

    Local paths come back unchanged. A remote URI is copied once per node into
    ``<cache_root>/<hash>/`` (default ``$WMSS_MODEL_CACHE`` or ``~/.cache/wmss-ray/models``):
    the hash covers the URI and every file's name, size and mtime, so a re-exported model gets
    a new copy; the copy goes to a temporary sibling, gets a marker file and is renamed, so a
    cache entry is complete or absent (concurrent copies on one node race harmlessly).
    """
    path = str(path)
    if not is_remote(path):
        return resolve_fs(path)[1] if is_uri(path) else path
    base, infos = _file_infos(path)
    if not infos:
        raise FileNotFoundError(f"model directory not found or empty: {redact(path)}")
    listing = sorted((posixpath.relpath(i.path, base), i.size, str(i.mtime)) for i in infos)
    digest = hashlib.sha256(repr((redact(path), listing)).encode()).hexdigest()[:24]
    root = cache_root or os.environ.get(MODEL_CACHE_ENV) or os.path.expanduser("~/.cache/wmss-ray/models")
    final = os.path.join(root, digest)
    if os.path.exists(os.path.join(final, _COMPLETE)):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{digest}-", dir=root)
    try:
        download_dir(path, tmp)
        with open(os.path.join(tmp, _COMPLETE), "w") as f:
            f.write(redact(path) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process on this node finished first
            if not os.path.exists(os.path.join(final, _COMPLETE)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

