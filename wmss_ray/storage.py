"""The one storage layer: every phase reads and writes files through these helpers.

Paths are local paths or URIs pyarrow understands (``file://``, ``s3://``, ``gs://``); all I/O
goes through ``pyarrow.fs`` so Ray tasks on other nodes and the driver agree on what a path
means. Corpora may be read from any such URI. ``run.storage`` (where runs are written) is
local or a shared filesystem for now: ``config.py`` refuses a URI there at load time until
object storage is supported end to end, so nothing silently writes to a local folder "s3:".

Layer: below every phase module; imports only pyarrow and the standard library.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """``scheme://...`` (``s3://b/x``, ``file:///x``) rather than a plain local path."""
    return "://" in str(path)


def resolve_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI (s3://, gs://, file://)."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a URI's scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def reset_dir(uri: str) -> None:
    """Create ``uri`` as an empty directory (stale parts of a crashed run must not mix in)."""
    fs, path = resolve_fs(uri)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)


def write_text(uri: str, text: str) -> None:
    """Write a whole small file (manifests, merged rejects); tmp + move where the fs allows."""
    fs, path = resolve_fs(uri)
    fs.create_dir(posixpath.dirname(path) or "/", recursive=True)
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)


def list_files(uri: str, suffix: str) -> list[str]:
    """Files under directory ``uri`` ending in ``suffix``, sorted, as URIs/paths like ``uri``."""
    fs, path = resolve_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [join(uri, posixpath.relpath(n, path)) for n in names]


def local_dir(path: str) -> str:
    """A run directory as an absolute local path (relative paths resolve against the cwd).

    Raises:
        ValueError: ``path`` is a URI; run directories are local or a shared filesystem until
            object storage is supported (``run.storage`` is refused at config load already).
    """
    if is_uri(path):
        raise ValueError(f"{path}: run directories must be local or a shared filesystem "
                         "(object storage URIs are not supported yet)")
    return os.path.realpath(str(path))  # as Path(path).resolve(): symlinks resolved

