"""A repository of checkpoints on any fsspec URL: content-addressed objects, manifests committed last.

Layout::

    <repo>/objects/<aa>/<hash>          immutable objects, named by the blake3 of their bytes
    <repo>/checkpoints/<name>.json      manifests; a manifest's presence is the commit
    <repo>/pending/<token>.json         objects an in-flight save will reference (protects them from gc)
    <repo>/gc.lock                      held while gc deletes

This layer moves bytes; it never sees tensors.

Commit: on local disk a manifest is written to a temporary file, fsync'd and hard-linked into place (atomic,
and it never replaces a committed checkpoint); on object stores it is one PUT, which is atomic there.

gc and concurrent saves: a save first records the hashes it will reference in ``pending/``, then waits while
``gc.lock`` exists, then checks which objects exist. gc takes the lock before it reads ``pending/``. So either
gc sees the save's pending record and keeps its objects, or the save sees the lock and only checks for
existing objects after gc has finished deleting.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckptkit.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptkitError,
    CorruptObjectError,
    RepositoryBusyError,
)
from ckptkit.format import hash_bytes

_HASH = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STALE_AFTER = 6 * 3600.0
"""Seconds after which a pending record is taken to belong to a crashed save."""
LOCK_STALE_AFTER = 900.0
"""Seconds after which a gc lock that was not refreshed is taken to belong to a crashed gc (a running gc
refreshes it every minute; a lock of a dead process on this host is stale at once)."""


def check_name(name: str) -> str:
    """Validate a checkpoint name; it becomes a storage path."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".json"):
        raise ValueError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it becomes a file name)"
        )
    return name


@dataclass(frozen=True)
class GcReport:
    """What :meth:`Repository.gc` found and removed."""

    objects_kept: int
    objects_removed: int
    bytes_removed: int
    temp_files_removed: int
    dry_run: bool


class Repository:
    """Checkpoint storage at ``url``, on any filesystem fsspec reaches.

    Args:
        url: a local path, ``file://``, ``memory://``, ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: passed to the fsspec filesystem (credentials, endpoint, ...); never stored.

    Example:
        >>> repo = Repository("memory://docs-example")
        >>> repo.list()
        []
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"repository URL must be a non-empty string, got {url!r}")
        self.url = url
        options = dict(storage_options or {})
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as err:
            proto = url.split("://", 1)[0]
            raise CkptkitError(
                f"cannot open {url}: the fsspec backend for {proto}:// is not installed ({err}); "
                f"for S3 install `ckptkit[s3]`"
            ) from err
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/") or "/"
        self.local = isinstance(fs, LocalFileSystem)
        self._lock_time = time.monotonic()
        if self.local:
            self.root = os.path.abspath(self.root)

    def __repr__(self) -> str:
        return f"Repository({self.url!r})"

    # --- paths ---------------------------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def object_path(self, h: str) -> str:
        """Where the object with hash ``h`` is stored."""
        if not _HASH.match(h):
            raise ValueError(f"invalid object hash {h!r}")
        return self._p("objects", h[:2], h)

    def manifest_path(self, name: str) -> str:
        """Where the manifest of checkpoint ``name`` is stored."""
        return self._p("checkpoints", check_name(name) + ".json")

    # --- objects -------------------------------------------------------------------------------------------

    def has_object(self, h: str) -> bool:
        """Whether the object exists (committed objects are never partial: they are renamed into place)."""
        return bool(self.fs.exists(self.object_path(h)))

    def write_object(self, h: str, chunks: Iterable[memoryview]) -> int:
        """Store an object under its hash. The caller computed ``h`` over ``chunks``; returns bytes written."""
        path = self.object_path(h)
        if self.local:
            return self._write_local(path, chunks, replace=True)
        size = 0
        with self.fs.open(path, "wb") as f:
            for c in chunks:
                f.write(c)
                size += len(c)
        return size

    def _write_local(self, path: str, chunks: Iterable[memoryview], replace: bool) -> int:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for c in chunks:
                view = memoryview(c).cast("B")
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            if replace:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if `path` exists: a committed checkpoint is never replaced
                finally:
                    os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
        return size

    def read_object(self, h: str, size: int | None = None) -> bytearray:
        """Read an object and verify its hash (and size, when known).

        Raises:
            FileNotFoundError: the object does not exist.
            CorruptObjectError: its bytes do not hash to ``h``.
        """
        path = self.object_path(h)
        if self.local:
            with open(path, "rb", buffering=0) as f:
                n = os.fstat(f.fileno()).st_size
                buf = bytearray(n)
                view = memoryview(buf)
                got = 0
                while got < n:
                    k = f.readinto(view[got:])
                    if not k:
                        break
                    got += k
                del view
                if got != n:
                    del buf[got:]
        else:
            buf = bytearray(self.fs.cat_file(path))
        if size is not None and len(buf) != size:
            raise CorruptObjectError(path, f"{size} bytes", f"{len(buf)} bytes", "size differs")
        found = hash_bytes(buf)
        if found != h:
            raise CorruptObjectError(path, h, found)
        return buf

    def list_objects(self) -> dict[str, int]:
        """Every stored object: hash -> size."""
        out: dict[str, int] = {}
        base = self._p("objects")
        if not self.fs.exists(base):
            return out
        for path, info in self.fs.find(base, detail=True).items():
            name = posixpath.basename(path)
            if _HASH.match(name):
                out[name] = int(info.get("size") or 0)
        return out

    # --- manifests -----------------------------------------------------------------------------------------

    def commit(self, name: str, manifest: bytes) -> None:
        """Write a manifest: the checkpoint exists from this moment on, complete, or not at all.

        Raises:
            CheckpointExistsError: a checkpoint of this name is already committed.
        """
        path = self.manifest_path(name)
        if self.local:
            try:
                self._write_local(path, [memoryview(manifest)], replace=False)
            except FileExistsError:
                raise CheckpointExistsError(self.url, name) from None
            return
        if self.fs.exists(path):
            raise CheckpointExistsError(self.url, name)
        self.fs.pipe_file(path, manifest)

    def read_manifest(self, name: str) -> bytes:
        """The raw bytes of a committed manifest."""
        try:
            data = self.fs.cat_file(self.manifest_path(name))
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.url, name, self.list()) from None
        return bytes(data)

    def list(self) -> list[str]:
        """Names of committed checkpoints, oldest manifest first (by modification time, then name)."""
        base = self._p("checkpoints")
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        found: list[tuple[float, str]] = []
        for e in entries:
            fname = posixpath.basename(e["name"].rstrip("/"))
            if e.get("type") == "file" and fname.endswith(".json") and _NAME.match(fname[:-5]):
                found.append((_mtime(e), fname[:-5]))
        return [n for _, n in sorted(found)]

    def delete(self, name: str) -> None:
        """Delete a checkpoint's manifest. Its objects become garbage for :meth:`gc` once unreferenced."""
        path = self.manifest_path(name)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.url, name, self.list()) from None

    # --- protection of in-flight saves ---------------------------------------------------------------------

    @contextlib.contextmanager
    def pending(self, hashes: Iterable[str], wait: float = 600.0) -> Iterator[None]:
        """Protect ``hashes`` from a concurrent gc while a save checks, writes and commits them."""
        path = self._p("pending", f"{uuid.uuid4().hex}.json")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                             "objects": sorted(set(hashes))}).encode()
        self._put_small(path, record)
        try:
            deadline = time.monotonic() + wait
            while self._gc_lock_held():
                if time.monotonic() > deadline:
                    raise RepositoryBusyError(
                        f"{self.url} is locked by gc ({self._p('gc.lock')}) for more than {wait:.0f}s; if no "
                        "gc is running, delete that file"
                    )
                time.sleep(0.05)
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def _put_small(self, path: str, data: bytes) -> None:
        if self.local:
            self._write_local(path, [memoryview(data)], replace=True)
        else:
            self.fs.pipe_file(path, data)

    def _gc_lock_held(self) -> bool:
        path = self._p("gc.lock")
        try:
            info = self.fs.info(path)
            owner = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return False
        except ValueError:
            owner = {}  # unreadable lock: judge it by age alone
        dead = owner.get("host") == socket.gethostname() and not _alive(owner.get("pid"))
        if dead or time.time() - _mtime(info) > LOCK_STALE_AFTER:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)  # left by a gc that crashed or was killed
            return False
        return True

    def _pending_objects(self) -> set[str]:
        keep: set[str] = set()
        base = self._p("pending")
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return keep
        for e in entries:
            if time.time() - _mtime(e) > STALE_AFTER:
                continue  # a save that crashed long ago; its objects are garbage
            try:
                rec = json.loads(self.fs.cat_file(e["name"]))
                keep.update(h for h in rec["objects"] if isinstance(h, str) and _HASH.match(h))
            except FileNotFoundError:
                continue  # the save finished while we listed
            except (ValueError, KeyError, TypeError):
                continue  # unreadable record: it protects nothing
        return keep

    # --- garbage collection --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Hold the repository's gc lock (see the module docstring for the protocol)."""
        path = self._p("gc.lock")
        if self._gc_lock_held():
            raise RepositoryBusyError(f"another gc holds {path}; wait for it, or delete the file if it crashed")
        self._refresh_lock()
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def _refresh_lock(self) -> None:
        self._lock_time = time.monotonic()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self._put_small(self._p("gc.lock"), json.dumps(owner).encode())

    def sweep(self, referenced: set[str], dry_run: bool = False) -> GcReport:
        """Delete unreferenced objects and stale temporary files. Call inside :meth:`gc_lock`, with
        ``referenced`` read after the lock was taken."""
        keep = referenced | self._pending_objects()
        stored = self.list_objects()
        removed = 0
        freed = 0
        for h, size in stored.items():
            if h in keep:
                continue
            removed += 1
            freed += size
            if time.monotonic() - self._lock_time > 60:
                self._refresh_lock()
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.object_path(h))
        temps = 0
        if self.local and os.path.isdir(self._p("objects")):
            now = time.time()
            for dirpath, _, files in os.walk(self._p("objects")):
                for f in files:
                    p = os.path.join(dirpath, f)
                    if f.startswith(".tmp-") and now - os.path.getmtime(p) > STALE_AFTER:
                        temps += 1
                        if not dry_run:
                            os.unlink(p)
        return GcReport(len(stored) - removed, removed, freed, temps, dry_run)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(v)
    return 0.0


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
