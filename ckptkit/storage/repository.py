"""A repository of checkpoints on any fsspec URL: content-addressed objects, manifests committed last.

Layout::

    <repo>/objects/<aa>/<hash>          immutable objects, named by the blake3 of their bytes
    <repo>/checkpoints/<name>.json      manifests; a manifest's presence is the commit
    <repo>/pending/<token>.json         objects an in-flight save will reference (protects them from gc)
    <repo>/lineage/<id>.json            manifests of pruned checkpoints, kept for their history
    <repo>/gc.lock                      held while gc deletes

This layer moves bytes; it never sees tensors. The semantics live here once, on top of the
:class:`~ckptkit.storage.backend.Backend` protocol; the backends (local disk, S3, any other fsspec
filesystem) only store whole objects under keys.

Commit: a manifest is written with the backend's ``put_if_absent``, so a committed checkpoint is never replaced.
On local disk it is written to a temporary file, fsync'd and hard-linked into place (atomic); on object stores it
is one PUT, which is atomic there (on S3 a conditional PUT, ``If-None-Match: *``, so that of two savers racing
for a name only one commits).

Object stores: every object is written with one PUT of complete bytes (on S3, objects larger than ``part_size``
go up as a multipart upload, which becomes visible only when it completes, and is aborted when the upload
fails), so an object under its final name is never partial. Directory listings are never served from fsspec's
listing cache: other processes (a concurrent save, gc) change the repository behind this one's back.

gc and concurrent saves: a save first records the hashes it will reference in ``pending/``, then waits while
``gc.lock`` exists, then checks which objects exist. gc takes the lock before it reads ``pending/``. So either
gc sees the save's pending record and keeps its objects, or the save sees the lock and only checks for
existing objects after gc has finished deleting. The lock is created with ``put_if_absent`` (two gcs that both
saw no lock: one wins), refreshed every minute while gc runs, and taken to be stale when its holder is a dead
process on this host or it was not refreshed for :data:`LOCK_STALE_AFTER` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptObjectError,
    InvalidArgumentError,
    RepositoryBusyError,
)
from ckptkit.hashing import check_hash, check_name, is_hash, is_name
from ckptkit.storage.backend import DEFAULT_MAX_CONCURRENCY, DEFAULT_PART_SIZE, Backend, Entry, open_backend

__all__ = ["LOCK_STALE_AFTER", "STALE_AFTER", "GcReport", "Repository"]

STALE_AFTER = 6 * 3600.0
"""Seconds after which a pending record is taken to belong to a crashed save (and a temporary file or an
incomplete multipart upload to a crashed write)."""
LOCK_STALE_AFTER = 900.0
"""Seconds after which a gc lock that was not refreshed is taken to belong to a crashed gc (a running gc
refreshes it every minute; a lock of a dead process on this host is stale at once)."""
LOCK_REFRESH = 60.0
"""Seconds between refreshes of the gc lock while gc deletes."""
DELETE_BATCH = 256
"""Objects gc hands to the backend at once (the lock is refreshed between batches)."""

_OBJECTS, _CHECKPOINTS, _PENDING, _LINEAGE, _LOCK = "objects", "checkpoints", "pending", "lineage", "gc.lock"


@dataclass(frozen=True)
class GcReport:
    """What :meth:`Repository.sweep` found and removed."""

    objects_kept: int
    objects_removed: int
    bytes_removed: int
    temp_files_removed: int  # crashed writes' temp files, stale pending records, stale multipart uploads
    """Stale temporary files (local disk) or stale incomplete multipart uploads (S3) removed."""
    dry_run: bool


class Repository:
    """Checkpoint storage at ``url``, on any filesystem fsspec reaches.

    Args:
        url: a local path, ``file://``, ``memory://``, ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: passed to the fsspec filesystem (credentials, endpoint, ...); never stored.
        part_size: S3 only: objects larger than this many bytes are uploaded in parts of this size (5 MiB to
            5 GiB; raised for an object that would otherwise need more than 10,000 parts). Default 8 MiB.
        max_concurrency: S3 only: how many requests (parts, or whole small objects) are in flight at once in one
            write. Default 8.

    Raises:
        InvalidArgumentError: (a ``ValueError``) ``part_size`` or ``max_concurrency`` out of range, or given for
            a repository that is not on S3 (they would have no effect there).
        MissingDependencyError: (an ``ImportError``) the fsspec implementation for the URL is not installed.

    Example:
        >>> repo = Repository("memory://docs-example")
        >>> repo.list()
        []
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        part_size: int | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        if isinstance(url, os.PathLike):
            url = os.fspath(url)
        if not isinstance(url, str) or not url:
            raise InvalidArgumentError(f"repository URL must be a non-empty string or path, got {url!r}")
        self.url = url
        self.backend: Backend = open_backend(url, storage_options, part_size=part_size,
                                             max_concurrency=max_concurrency)  # fmt: skip
        self.fs: Any = self.backend.fs
        self.root: str = self.backend.root
        self.local = self.backend.kind == "local"
        self.s3 = self.backend.kind == "s3"
        # S3 tuning, as the backend validated it (the defaults elsewhere, where nothing uses them)
        self.part_size: int = getattr(self.backend, "part_size", DEFAULT_PART_SIZE)
        self.max_concurrency: int = getattr(self.backend, "max_concurrency", DEFAULT_MAX_CONCURRENCY)
        self._lock_time = time.monotonic()

    def __repr__(self) -> str:
        return f"Repository({self.url!r})"

    # --- paths ---------------------------------------------------------------------------------------------

    def object_path(self, h: str) -> str:
        """Where the object with hash ``h`` is stored."""
        return posixpath.join(self.root, self._object_key(h))

    def manifest_path(self, name: str) -> str:
        """Where the manifest of checkpoint ``name`` is stored."""
        return posixpath.join(self.root, self._manifest_key(name))

    @staticmethod
    def _object_key(h: str) -> str:
        check_hash(h)
        return f"{_OBJECTS}/{h[:2]}/{h}"

    @staticmethod
    def _manifest_key(name: str) -> str:
        return f"{_CHECKPOINTS}/{check_name(name)}.json"

    # --- objects -------------------------------------------------------------------------------------------

    def has_object(self, h: str) -> bool:
        """Whether the object exists (stored objects are never partial: renamed into place on local disk,
        written with one PUT or a completed multipart upload on object stores)."""
        return not self.backend.missing([self._object_key(h)])

    def missing_objects(self, hashes: Iterable[str]) -> list[str]:
        """The hashes among ``hashes`` with no stored object, in order (on S3 the HEADs run concurrently)."""
        hs = list(hashes)
        keys = {h: self._object_key(h) for h in hs}
        missing = set(self.backend.missing([*dict.fromkeys(keys.values())]))
        return [h for h in hs if keys[h] in missing]

    def write_object(self, h: str, chunks: Iterable[memoryview]) -> int:
        """Store an object under its hash. The caller computed ``h`` over ``chunks``; returns bytes written."""
        return self.backend.put([(self._object_key(h), chunks)])

    def write_objects(self, objects: list[tuple[str, Iterable[memoryview]]]) -> int:
        """Store several objects; on local disk each one's fsync overlaps the writing of the next, on S3 they
        upload concurrently within one budget of ``max_concurrency`` requests.

        An object appears under its final name only after its bytes are stored, so a crash at any moment
        leaves complete objects and temporary files (removed by gc), never a partial object.
        """
        return self.backend.put([(self._object_key(h), chunks) for h, chunks in objects])

    def read_object(self, h: str, size: int | None = None) -> memoryview:
        """Read an object and verify its hash (and size, when known); a writable buffer of its bytes.

        Raises:
            FileNotFoundError: the object does not exist.
            CorruptObjectError: its bytes do not hash to ``h``.
        """
        buf, found = self.backend.get(self._object_key(h))
        if size is not None and len(buf) != size:
            raise CorruptObjectError(self.object_path(h), f"{size} bytes", f"{len(buf)} bytes", "size differs")
        if found != h:
            raise CorruptObjectError(self.object_path(h), h, found)
        return buf

    def list_objects(self) -> dict[str, int]:
        """Every stored object: hash -> size."""
        out: dict[str, int] = {}
        for e in self.backend.list(_OBJECTS):
            name = posixpath.basename(e.key)
            if is_hash(name):
                out[name] = e.size
        return out

    # --- manifests -----------------------------------------------------------------------------------------

    def commit(self, name: str, manifest: bytes) -> None:
        """Write a manifest: the checkpoint exists from this moment on, complete, or not at all.

        Raises:
            CheckpointExistsError: a checkpoint of this name is already committed.
        """
        if not self.backend.put_if_absent(self._manifest_key(name), manifest):
            raise CheckpointExistsError(self.url, name)

    def read_manifest(self, name: str) -> bytes:
        """The raw bytes of a committed manifest.

        Raises:
            CheckpointNotFoundError: (a ``FileNotFoundError``) no checkpoint of that name.
        """
        try:
            data, _ = self.backend.get(self._manifest_key(name))
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.url, name, self.list()) from None
        return bytes(data)

    def list(self) -> list[str]:
        """Names of committed checkpoints, oldest manifest first (by modification time, then name)."""
        found: list[tuple[float, str]] = []
        for e in _children(self.backend.list(_CHECKPOINTS), _CHECKPOINTS):
            fname = posixpath.basename(e.key)
            if fname.endswith(".json") and is_name(fname[:-5]):
                found.append((e.mtime, fname[:-5]))
        return [n for _, n in sorted(found)]

    def delete(self, name: str) -> None:
        """Delete a checkpoint's manifest. Its objects become garbage for :meth:`gc` once unreferenced.

        Raises:
            CheckpointNotFoundError: (a ``FileNotFoundError``) no checkpoint of that name.
        """
        key = self._manifest_key(name)
        if self.backend.missing([key]):  # an object store deletes a missing key without complaint
            raise CheckpointNotFoundError(self.url, name, self.list())
        self.backend.delete([key])

    def archive(self, manifest_id: str, manifest: bytes) -> None:
        """Keep a pruned checkpoint's manifest under ``lineage/<id>.json`` so its history stays readable (its
        objects are still collected by gc; archived manifests reference nothing)."""
        self.backend.put([(self._archive_key(manifest_id), [memoryview(manifest)])])

    def read_archived(self, manifest_id: str) -> bytes | None:
        """An archived manifest's bytes, or None."""
        try:
            data, _ = self.backend.get(self._archive_key(manifest_id))
        except FileNotFoundError:
            return None
        return bytes(data)

    @staticmethod
    def _archive_key(manifest_id: str) -> str:
        return f"{_LINEAGE}/{check_hash(manifest_id, 'manifest id')}.json"

    # --- protection of in-flight saves ---------------------------------------------------------------------

    @contextlib.contextmanager
    def pending(self, hashes: Iterable[str], wait: float = 600.0) -> Iterator[None]:
        """Protect ``hashes`` from a concurrent gc while a save checks, writes and commits them."""
        key = f"{_PENDING}/{uuid.uuid4().hex}.json"
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                             "objects": sorted(set(hashes))}).encode()  # fmt: skip
        self.backend.put([(key, [memoryview(record)])])
        try:
            deadline = time.monotonic() + wait
            while self._gc_lock_held():
                if time.monotonic() > deadline:
                    raise RepositoryBusyError(
                        f"{self.url} is locked by gc ({posixpath.join(self.root, _LOCK)}) for more than "
                        f"{wait:.0f}s; if no gc is running, delete that file"
                    )
                time.sleep(0.05)
            yield
        finally:
            self.backend.delete([key])

    def _gc_lock_held(self) -> bool:
        try:
            info = self.backend.info(_LOCK)
            data, _ = self.backend.get(_LOCK)
        except FileNotFoundError:
            return False
        try:
            owner = json.loads(bytes(data))
        except ValueError:
            owner = None
        if not isinstance(owner, dict):
            owner = {}  # unreadable lock: judge it by age alone
        dead = owner.get("host") == socket.gethostname() and not _alive(owner.get("pid"))
        if dead or time.time() - info.mtime > LOCK_STALE_AFTER:
            self.backend.delete([_LOCK])  # left by a gc that crashed or was killed
            return False
        return True

    def _pending_objects(self) -> set[str]:
        keep: set[str] = set()
        for e in _children(self.backend.list(_PENDING), _PENDING):
            if time.time() - e.mtime > STALE_AFTER:
                continue  # a save that crashed long ago; its objects are garbage
            try:
                data, _ = self.backend.get(e.key)
                rec = json.loads(bytes(data))
                keep.update(h for h in rec["objects"] if is_hash(h))
            except FileNotFoundError:
                continue  # the save finished while we listed
            except (ValueError, KeyError, TypeError):
                continue  # unreadable record: it protects nothing
        return keep

    # --- garbage collection --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Hold the repository's gc lock (see the module docstring for the protocol)."""
        busy = f"another gc holds {posixpath.join(self.root, _LOCK)}; wait for it, or delete the file if it crashed"
        if self._gc_lock_held():
            raise RepositoryBusyError(busy)
        self._lock_time = time.monotonic()
        if not self.backend.put_if_absent(_LOCK, self._lock_owner()):  # two gcs that both saw no lock: one wins
            raise RepositoryBusyError(busy)
        try:
            yield
        finally:
            self.backend.delete([_LOCK])

    def _lock_owner(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()

    def _refresh_lock(self) -> None:
        self._lock_time = time.monotonic()
        self.backend.put([(_LOCK, [memoryview(self._lock_owner())])])

    def sweep(self, referenced: set[str], dry_run: bool = False) -> GcReport:
        """Delete unreferenced objects and stale temporary files. Call inside :meth:`gc_lock`, with
        ``referenced`` read after the lock was taken."""
        keep = referenced | self._pending_objects()
        stored = self.list_objects()
        garbage = [h for h in stored if h not in keep]
        for i in range(0, len(garbage), DELETE_BATCH):
            if time.monotonic() - self._lock_time > LOCK_REFRESH:
                self._refresh_lock()
            if not dry_run:
                self.backend.delete([self._object_key(h) for h in garbage[i : i + DELETE_BATCH]])
        # Temporaries of writes that crashed (temp files on disk, incomplete multipart uploads on S3) ...
        temps = self.backend.remove_stale_temporaries((_OBJECTS, _CHECKPOINTS, _PENDING, _LINEAGE), STALE_AFTER,
                                                      dry_run)  # fmt: skip
        # ... and the pending records of saves that crashed, which protect nothing.
        now = time.time()
        stale = [e.key for e in _children(self.backend.list(_PENDING), _PENDING) if now - e.mtime > STALE_AFTER]
        if stale and not dry_run:
            self.backend.delete(stale)
        freed = sum(stored[h] for h in garbage)
        return GcReport(len(stored) - len(garbage), len(garbage), freed, temps + len(stale), dry_run)


def _children(entries: list[Entry], prefix: str) -> list[Entry]:
    """The entries directly under ``prefix/`` (not in a folder below it)."""
    return [e for e in entries if "/" not in e.key[len(prefix) + 1 :]]


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
