"""The generic backend: any fsspec filesystem (``memory://``, ``gcs://``, ``az://``, ...), through fsspec's own calls.

Every object is written with one PUT of its complete bytes (``pipe_file``): streaming through ``fs.open()``
would, on an error mid-way, close the file and so store a truncated object under the name of the whole one.
``put_if_absent`` is an existence check followed by the write: not atomic, which is the best a filesystem
without conditional writes allows (local disk and S3 have backends of their own that do better).

:class:`~ckptkit.storage.local.LocalBackend` and :class:`~ckptkit.storage.s3.S3Backend` reuse its listing,
lookup and deletion, and replace what their store does better.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

from ckptkit.errors import CorruptObjectError
from ckptkit.hashing import hash_bytes
from ckptkit.storage.backend import Entry

__all__ = ["FsspecBackend", "info_mtime"]


class FsspecBackend:
    """A :class:`~ckptkit.storage.backend.Backend` on any fsspec filesystem ``fs``, with keys under ``root``.

    Example:
        >>> import fsspec
        >>> b = FsspecBackend(fsspec.filesystem("memory"), "/docs-fsspec-backend")
        >>> b.put([("a/x", [memoryview(b"hello")])])
        5
        >>> [(e.key, e.size) for e in b.list("a")], b.missing(["a/x", "a/y"])
        ([('a/x', 5)], ['a/y'])
    """

    kind = "fsspec"

    def __init__(self, fs: Any, root: str) -> None:
        self.fs: Any = fs
        self.root: str = root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.fs).__name__}, {self.root!r})"

    def path(self, key: str) -> str:
        """The path of ``key`` in ``fs``'s namespace."""
        return posixpath.join(self.root, key)

    def put(self, objects: Iterable[tuple[str, Iterable[memoryview]]]) -> int:
        written = 0
        for key, chunks in objects:
            data = b"".join(chunks)  # one PUT of the complete bytes (see the module docstring)
            self.fs.pipe_file(self.path(key), data)
            written += len(data)
        return written

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self.path(key)
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def get(self, key: str, max_size: int | None = None) -> tuple[memoryview, str]:
        """The object's bytes; with ``max_size``, at most one byte more is fetched (one ranged read), and an
        object that has more is refused."""
        path = self.path(key)
        if max_size is None:
            data = self.fs.cat_file(path)
        else:
            data = self.fs.cat_file(path, start=0, end=max_size + 1)
            if len(data) > max_size:
                raise CorruptObjectError(path, f"at most {max_size} bytes", f"more than {max_size} bytes",
                                         "larger than expected; not read in full")  # fmt: skip
        buf = memoryview(bytearray(data))
        return buf, hash_bytes(buf)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return bytes(self.fs.cat_file(self.path(key), start=offset, end=offset + length))

    def info(self, key: str) -> Entry:
        info = self.fs.info(self.path(key))
        return Entry(key, int(info.get("size") or 0), info_mtime(info))

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in keys if not self.fs.exists(self.path(k))]

    def delete(self, keys: Sequence[str]) -> None:
        for k in keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(k))

    def remove_stale_temporaries(self, prefixes: Sequence[str], older_than: float, dry_run: bool) -> int:
        """Nothing to remove: ``pipe_file`` writes complete objects and leaves no temporaries."""
        return 0

    def entries(self, prefix: str, found: dict[str, dict[str, Any]]) -> list[Entry]:
        """The files of an fsspec ``find(..., detail=True)`` result under ``prefix/``, as entries."""
        base = self.path(prefix).rstrip("/") + "/"
        out: list[Entry] = []
        for path, info in found.items():
            if info.get("type", "file") != "file" or not path.startswith(base):
                continue  # a directory, or the prefix itself when it is a file
            key = posixpath.join(prefix.rstrip("/"), path[len(base) :])
            out.append(Entry(key, int(info.get("size") or 0), info_mtime(info)))
        return out

    # Named like the builtin, so last: the annotations above mean the builtin ``list``.
    def list(self, prefix: str) -> list[Entry]:
        top = self.path(prefix).rstrip("/")
        try:
            found = self.fs.find(top, detail=True)
        except FileNotFoundError:
            return []
        return self.entries(prefix, found)


def info_mtime(info: dict[str, Any]) -> float:
    """The modification time in an fsspec ``info`` dict (its key differs between filesystems); 0.0 if none."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(v)
    return 0.0
