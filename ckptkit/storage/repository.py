"""A repository of checkpoints on any fsspec URL: content-addressed objects, manifests committed last.

Layout::

    <repo>/objects/<aa>/<hash>          immutable objects, named by the blake3 of their bytes
    <repo>/checkpoints/<name>.json      manifests; a manifest's presence is the commit
    <repo>/pending/<token>.json         objects an in-flight save will reference (protects them from gc)
    <repo>/lineage/<id>.json            manifests of pruned checkpoints, kept for their history
    <repo>/gc.lock                      held while gc deletes
    <repo>/repository.json              settings every writer honours (the codec); absent: the defaults

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

gc and concurrent saves: a save first records the hashes it will reference in ``pending/``, then waits while a
gc holds a live ``gc.lock``, then checks which objects exist, writes the missing ones, commits its manifest and
removes its record. gc takes the lock, then reads the pending records, and only then lists the manifests and the
objects. Every save is seen by one of the two reads: its record exists from before its objects are checked until
after its manifest is committed, so a record that gc's read misses was either written after it (and the save
then finds the lock and checks for objects only after gc has finished deleting) or removed before it (and the
manifest, committed before that, is in gc's listing, made after). (Listing the manifests first, as before, lost
a save that committed and removed its record between the two reads.)

The lock is a lease, not a process id (a pid means nothing across hosts or PID namespaces): it records its
holder's token and lease, and is stale once it has not been renewed for its lease (at most
:data:`LOCK_STALE_AFTER` seconds), judged by the time the store gives its last write (a lock whose content is
unreadable, ``[]``, ``null``, a number, is judged so with the default lease). A running gc renews it from a
background thread every sixth of the lease (on local disk by touching the file, which writes no data) and stops
deleting if it could not renew for half the lease; saves wait while it is live, a second gc is refused; a stale
lock is ignored by saves and taken over by the next gc. It is created with ``put_if_absent`` (two gcs that both
saw no lock: one wins). On a full local disk, where its record cannot be written, gc takes the lock as an empty
file (an inode, no data blocks) judged by the default lease, so gc can free space there (docs/format.md,
"Concurrency contract").

Full disk: a write that finds no room (``ENOSPC``, ``EDQUOT``) raises :class:`~ckptkit.errors.StorageFullError`
naming the file and the repository, having removed what it started; :meth:`Repository.retire` moves a manifest
into ``lineage/`` (a rename on local disk, which needs no data blocks), so pruning works on a full disk too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from ckptkit.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptObjectError,
    InvalidArgumentError,
    ManifestError,
    RepositoryBusyError,
    StorageFullError,
)
from ckptkit.hashing import check_hash, check_name, hash_bytes, is_hash, is_name
from ckptkit.storage.backend import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_PART_SIZE,
    MAX_MANIFEST_SIZE,
    Backend,
    Entry,
    open_backend,
)
from ckptkit.storage.local import LocalBackend

__all__ = ["CONFIG_MAX_SIZE", "LOCK_STALE_AFTER", "STALE_AFTER", "GcReport", "Repository", "register_decoder"]

STALE_AFTER = 6 * 3600.0
"""Seconds after which a pending record is taken to belong to a crashed save (and a temporary file or an
incomplete multipart upload to a crashed write)."""
LOCK_STALE_AFTER = 120.0
"""The gc lock's lease, in seconds (and the longest a holder may ask for): a lock not renewed for this long
belongs to a gc that crashed, was killed or lost the store, and is taken over by the next gc (saves ignore it),
never earlier. A running gc renews it every sixth of its lease; an unreadable lock is judged by this lease."""
DELETE_BATCH = 256
"""Objects gc hands to the backend at once (it checks that its lease holds before each batch)."""
_LOCK_MAX_SIZE = 64 << 10
"""Bytes: a gc lock larger than this is not read (it is judged by its age alone)."""
_FULL = StorageFullError.ERRNOS
_MTIME_RESOLUTION = 1.0
"""Seconds: stores report modification times to the second (S3's Last-Modified), so a lock may look this much
older than it is; a lock counts as stale only once its lease plus this has passed."""

_OBJECTS, _CHECKPOINTS, _PENDING, _LINEAGE, _LOCK = "objects", "checkpoints", "pending", "lineage", "gc.lock"
_CONFIG = "repository.json"
CONFIG_MAX_SIZE = 64 << 10
"""Bytes: a repository config larger than this is refused unread."""
_CODEC_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

# Stored forms other than raw bytes: an object whose bytes start with a registered prefix is decoded by its
# function (bytes, the manifest's size or None, the object's path) into the bytes its name is the hash of. The
# codecs (ckptkit.codecs, above this layer: they need element sizes) register themselves when imported; this
# layer only moves bytes.
_DECODERS: dict[bytes, Callable[[memoryview, int | None, str], memoryview]] = {}


def register_decoder(prefix: bytes, decode: Callable[[memoryview, int | None, str], memoryview]) -> None:
    """Have :meth:`Repository.read_object` decode stored objects whose bytes start with ``prefix`` by ``decode``
    (``decode(stored, size, path)`` returns exactly the object's bytes, or raises ``CorruptObjectError``); the
    object's hash is checked on what it returns. Called by :mod:`ckptkit.codecs` when imported.

    Example:
        >>> register_decoder(b"\\x89CKC\\r\\n\\x1a\\n", lambda stored, size, path: stored)  # doctest: +SKIP
    """
    if not isinstance(prefix, bytes) or len(prefix) < 8:
        raise InvalidArgumentError(f"a decoder's prefix must be at least 8 bytes, got {prefix!r}")
    _DECODERS[prefix] = decode


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
        timeout: S3 only: the deadline of each request in seconds, retries included, plus a second per MiB it
            carries (default 60); past it the call raises ``StorageTimeoutError`` (see docs/cloud-storage.md).
        read_part_size: S3 only: objects are read with concurrent ranged GETs of this many bytes (1 MiB to
            5 GiB). Default 64 MiB.
        read_concurrency: S3 only: ranged GETs in flight at once across this repository's reads. Default 8.
        direct_io: local disk only: write objects of 4 MiB and more with ``O_DIRECT``, bypassing the page cache
            (less CPU, which an async save takes from training; the dataset's cached pages stay), where the
            filesystem supports it: True in every save, False never, None (the default) in async saves only.

    Raises:
        InvalidArgumentError: (a ``ValueError``) an S3 option (``part_size``, ``max_concurrency``, ``timeout``,
            ``read_part_size``, ``read_concurrency``) out of range, or given for a repository that is not on S3
            (they would have no effect there); ``direct_io`` given for a repository not on local disk.
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
        timeout: float | None = None,
        read_part_size: int | None = None,
        read_concurrency: int | None = None,
        direct_io: bool | None = None,
    ) -> None:
        if isinstance(url, os.PathLike):
            url = os.fspath(url)
        if not isinstance(url, str) or not url:
            raise InvalidArgumentError(f"repository URL must be a non-empty string or path, got {url!r}")
        self.url = url
        self.backend: Backend = open_backend(url, storage_options, part_size=part_size,
                                             max_concurrency=max_concurrency, timeout=timeout,
                                             read_part_size=read_part_size,
                                             read_concurrency=read_concurrency,
                                             direct_io=direct_io)  # fmt: skip
        self.fs: Any = self.backend.fs
        self.root: str = self.backend.root
        self.local = self.backend.kind == "local"
        self.s3 = self.backend.kind == "s3"
        # S3 tuning, as the backend validated it (the defaults elsewhere, where nothing uses them)
        self.part_size: int = getattr(self.backend, "part_size", DEFAULT_PART_SIZE)
        self.max_concurrency: int = getattr(self.backend, "max_concurrency", DEFAULT_MAX_CONCURRENCY)
        self._holder: _LockHolder | None = None  # while this object holds the gc lock
        self._protected: set[str] = set()  # objects of the saves in flight when the lock was taken
        self._codec: str | EllipsisType | None = ...  # the configured codec, read on first use

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
        return self.write_objects([(h, chunks)])

    def write_objects(self, objects: Iterable[tuple[str, Iterable[memoryview]]]) -> int:
        """Store several objects; on local disk each one's fsync overlaps the writing of the next, on S3 they
        upload concurrently within one budget of ``max_concurrency`` requests. ``objects`` may be a generator
        (objects encoded as they are needed): it is consumed while the objects it gave are being stored.

        An object appears under its final name only after its bytes are stored, so a crash at any moment
        leaves complete objects and temporary files (removed by gc), never a partial object; so does a full
        disk, which raises :class:`~ckptkit.errors.StorageFullError`.
        """
        with self._writing(_OBJECTS):
            if isinstance(objects, list):
                return self.backend.put([(self._object_key(h), chunks) for h, chunks in objects])
            return self.backend.put((self._object_key(h), chunks) for h, chunks in objects)

    def read_object(self, h: str, size: int | None = None) -> memoryview:
        """Read an object and verify its hash (and size, when known); a writable buffer of its bytes.

        An object stored encoded by a codec (compressed: its first bytes say so, see :func:`register_decoder`) is
        decoded, bounded by ``size``, and the hash is checked on the decoded bytes: the name of an object is the
        hash of its bytes whatever form it is stored in.

        Raises:
            FileNotFoundError: the object does not exist.
            CorruptObjectError: its bytes do not hash to ``h``, it has not ``size`` bytes (a larger one is
                refused unread), it is not a regular file, or it is stored encoded and its encoded data is damaged.
        """
        buf, found = self.backend.get(self._object_key(h), size)  # a larger file is refused unread
        if found == h and (size is None or len(buf) == size):
            return buf
        decode = next((f for p, f in _DECODERS.items() if bytes(buf[: len(p)]) == p), None)
        if decode is None:
            if size is not None and len(buf) != size:
                raise CorruptObjectError(self.object_path(h), f"{size} bytes", f"{len(buf)} bytes", "size differs")
            raise CorruptObjectError(self.object_path(h), h, found)
        data = decode(buf, size, self.object_path(h))
        del buf
        found = hash_bytes(data)
        if found != h:
            raise CorruptObjectError(self.object_path(h), h, found, "hash of the decoded bytes")
        return data

    def read_object_prefix(self, h: str, n: int = 80) -> bytes:
        """The first ``n`` bytes of an object as stored (what tells its stored form), unverified.

        Raises:
            FileNotFoundError: the object does not exist.
        """
        info = self.backend.info(self._object_key(h))
        return self.backend.get_range(self._object_key(h), 0, min(n, info.size))

    # --- configuration -------------------------------------------------------------------------------------

    @property
    def codec(self) -> str | None:
        """The codec new objects are stored with (``repository.json``; None, the default: raw), read once per
        Repository object. Objects say their own form when read, so changing it never breaks a checkpoint.

        Raises:
            ManifestError: ``repository.json`` is not a config record ckptkit wrote.
        """
        if self._codec is ...:
            try:
                data, _ = self.backend.get(_CONFIG, CONFIG_MAX_SIZE)
            except FileNotFoundError:
                self._codec = None
                return None
            except CorruptObjectError as err:
                raise ManifestError(posixpath.join(self.root, _CONFIG), f"expected {err.expected}, found "
                                    f"{err.found}; not read: remove it, then configure the repository "
                                    "again") from err  # fmt: skip
            self._codec = _parse_config(bytes(data), posixpath.join(self.root, _CONFIG))
        return self._codec

    def configure(self, *, codec: str | None) -> None:
        """Store the repository's settings in ``<repo>/repository.json``, for every later writer in any process.

        Args:
            codec: how new objects are stored: ``"byteplane-zstd"`` (lossless compression; see
                docs/format.md) or None (raw, the default). Objects already stored keep their form.

        Raises:
            InvalidArgumentError: ``codec`` is not a codec name.

        Example:
            >>> repo = Repository("memory://docs-configure")
            >>> repo.configure(codec="byteplane-zstd")
            >>> Repository("memory://docs-configure").codec
            'byteplane-zstd'
        """
        if codec is not None and (not isinstance(codec, str) or not _CODEC_NAME.fullmatch(codec)):
            raise InvalidArgumentError(f"codec={codec!r}: use a codec name such as 'byteplane-zstd', or None for "
                                       "raw objects")  # fmt: skip
        record = json.dumps({"version": 1, "codec": codec}, sort_keys=True).encode()
        with self._writing(_CONFIG):
            self.backend.put([(_CONFIG, [memoryview(record)])])
        self._codec = codec

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
            StorageFullError: (an ``OSError``) no space left for the manifest: nothing was committed.
        """
        key = self._manifest_key(name)
        if isinstance(self.backend, LocalBackend):
            self.backend.ensure_folder(_LINEAGE)  # so that retire() never has to make a folder on a full disk
        with self._writing(key):
            committed = self.backend.put_if_absent(key, manifest)
        if not committed:
            raise CheckpointExistsError(self.url, name)

    def read_manifest(self, name: str) -> bytes:
        """The raw bytes of a committed manifest.

        Raises:
            CheckpointNotFoundError: (a ``FileNotFoundError``) no checkpoint of that name.
            ManifestError: what is stored under its name is not a regular file, or is larger than
                ``MAX_MANIFEST_SIZE`` (it is not read).
        """
        try:
            data, _ = self.backend.get(self._manifest_key(name), MAX_MANIFEST_SIZE)
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.url, name, self.list()) from None
        except CorruptObjectError as err:  # not a regular file, or larger than any manifest
            raise ManifestError(self.manifest_path(name), f"expected {err.expected}, found {err.found}; not "
                                "read") from err  # fmt: skip
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
        objects are still collected by gc; archived manifests reference nothing). A new write: on a full disk use
        :meth:`retire`, which moves the committed manifest instead."""
        key = self._archive_key(manifest_id)
        with self._writing(key):
            self.backend.put([(key, [memoryview(manifest)])])

    def retire(self, name: str, manifest_id: str) -> None:
        """Prune checkpoint ``name``: move its manifest to ``lineage/<manifest_id>.json``, where its history stays
        readable (:meth:`read_archived`); its objects become garbage for gc once unreferenced.

        A move, not a copy plus a delete of new bytes, so that it frees space on a full disk: a rename on local
        disk (atomic; no data blocks needed), a server-side copy and a delete on S3, copy and delete on other
        fsspec filesystems.

        Raises:
            CheckpointNotFoundError: (a ``FileNotFoundError``) no checkpoint of that name (e.g. already pruned).
            StorageFullError: (an ``OSError``) local disk only, where ``lineage/`` had to grow: nothing moved.
        """
        src, dst = self._manifest_key(name), self._archive_key(manifest_id)
        try:
            with self._writing(dst):
                if isinstance(self.backend, LocalBackend):
                    self.backend.move(src, dst)
                else:
                    self.fs.copy(posixpath.join(self.root, src), posixpath.join(self.root, dst))  # server-side on S3
                    self.backend.delete([src])
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.url, name, self.list()) from None

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
        """Protect ``hashes`` from a concurrent gc while a save checks, writes and commits them.

        Writes the save's pending record, then waits while a gc holds a live lock (at most ``wait`` seconds; a
        lock whose lease ran out is ignored), then runs the body; the record is removed afterwards. The body
        must check which objects exist only inside this block (see the module docstring for why that is safe).

        Raises:
            StorageFullError: (an ``OSError``) the record cannot be written: no space left.
            RepositoryBusyError: a gc held the lock for more than ``wait`` seconds.
        """
        key = f"{_PENDING}/{uuid.uuid4().hex}.json"
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                             "objects": sorted(set(hashes))}).encode()  # fmt: skip
        with self._writing(key):
            self.backend.put([(key, [memoryview(record)])])
        try:
            deadline = time.monotonic() + wait
            while self._gc_lock_held():
                if time.monotonic() > deadline:
                    raise RepositoryBusyError(
                        f"{self.url} is locked by a running gc ({posixpath.join(self.root, _LOCK)}) for more "
                        f"than {wait:.0f}s; a live gc renews its lease, a crashed one's lock is ignored once its "
                        f"lease (at most {LOCK_STALE_AFTER:.0f}s) runs out: retry then"
                    )
                time.sleep(0.05)
            yield
        finally:
            self.backend.delete([key])

    def _gc_lock_held(self) -> bool:
        """Whether a gc holds a live lock: one whose lease has not run out. A stale lock is left in place (only a
        gc that takes the lock over removes it) and does not count."""
        lock = self._read_lock()
        return lock is not None and not lock.stale()

    def _read_lock(self) -> _Lock | None:
        """The gc lock as stored now, or None when there is none."""
        try:
            data, _ = self.backend.get(_LOCK, _LOCK_MAX_SIZE)
            raw: bytes | None = bytes(data)
        except FileNotFoundError:
            return None
        except CorruptObjectError:
            raw = None  # a directory, a FIFO, or far larger than any lock: judged by its age alone
        try:
            info = self.backend.info(_LOCK)  # after the read: a renewal in between makes it look younger, not older
        except FileNotFoundError:
            return None
        token, lease, holder = _parse_lock(raw)
        return _Lock(raw, info.mtime, token, lease, holder)

    def _pending_objects(self) -> set[str]:
        keep: set[str] = set()
        for e in _children(self.backend.list(_PENDING), _PENDING):
            if time.time() - e.mtime > STALE_AFTER:
                continue  # a save that crashed long ago; its objects are garbage
            try:
                data, _ = self.backend.get(e.key, MAX_MANIFEST_SIZE)
                rec = json.loads(bytes(data))
                keep.update(h for h in rec["objects"] if is_hash(h))
            except FileNotFoundError:
                continue  # the save finished (committed) while we listed: its manifest is listed after this
            except (ValueError, KeyError, TypeError, RecursionError, CorruptObjectError):
                continue  # unreadable record: it protects nothing
        return keep

    # --- garbage collection --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gc_lock(self, lease: float | None = None) -> Iterator[None]:
        """Hold the repository's gc lock, under a lease (see the module docstring for the protocol).

        Taking it reads the pending records of the saves in flight, before the caller lists any manifest;
        :meth:`sweep` keeps their objects. While held, a background thread renews the lease every sixth of it;
        :meth:`sweep` stops deleting (``RepositoryBusyError``) if the lease could not be renewed for half of it.

        Args:
            lease: seconds (0 < lease <= :data:`LOCK_STALE_AFTER`, the default) after the last renewal at which
                others take the lock to be left by a crashed gc.

        Raises:
            RepositoryBusyError: another gc holds a live lock.
            StorageFullError: not even the lock can be written (on local disk the lock falls back to an empty
                file, which needs no data blocks; this is raised when even that fails, e.g. no inodes left).
        """
        lease = LOCK_STALE_AFTER if lease is None else lease
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease <= LOCK_STALE_AFTER:
            raise InvalidArgumentError(f"lease={lease!r}: must be a number of seconds, more than 0 and at most "
                                       f"LOCK_STALE_AFTER ({LOCK_STALE_AFTER:g})")  # fmt: skip
        if self._holder is not None:
            raise RepositoryBusyError(f"this Repository object already holds {posixpath.join(self.root, _LOCK)}")
        if self._gc_lock_held():
            raise RepositoryBusyError(self._busy())
        holder = _LockHolder(self, float(lease))
        holder.acquire()
        self._holder = holder
        try:
            holder.start()
            # Before any manifest is listed: a save whose record this misses either wrote it after this (and
            # then finds the lock, and waits), or removed it before (and so committed before the listing).
            self._protected = self._pending_objects()
            yield
        except BaseException:
            self._holder, self._protected = None, set()
            holder.release(quiet=True)
            raise
        self._holder, self._protected = None, set()
        holder.release()

    def _busy(self, lock: _Lock | None = None) -> str:
        where = posixpath.join(self.root, _LOCK)
        lock = lock or self._read_lock()
        if lock is None:
            return f"another gc holds {where}; wait for it"
        left = max(0.0, lock.lease - lock.age())
        by = f" ({lock.holder})" if lock.holder else ""
        return (f"another gc{by} holds {where}; wait for it: a live gc renews its lease, and the lock of one that "
                f"crashed is taken over when the lease runs out (in {left:.0f}s unless renewed)")

    def sweep(self, referenced: set[str], dry_run: bool = False) -> GcReport:
        """Delete unreferenced objects and stale temporary files. Call inside :meth:`gc_lock`, with
        ``referenced`` read after the lock was taken; the objects of the saves that were in flight when the lock
        was taken are kept too.

        Raises:
            InvalidArgumentError: called outside :meth:`gc_lock`.
            RepositoryBusyError: the lock's lease could not be renewed (this gc stopped before deleting more).
        """
        holder = self._holder
        if holder is None:
            raise InvalidArgumentError("Repository.sweep() must run inside `with repo.gc_lock():` (it keeps the "
                                       "objects of the saves in flight that the lock recorded)")  # fmt: skip
        keep = referenced | self._protected
        stored = self.list_objects()
        garbage = [h for h in stored if h not in keep]
        for i in range(0, len(garbage), DELETE_BATCH):
            holder.check()  # never delete under a lease that may have run out
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

    # --- writes --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, key: str) -> Iterator[None]:
        """Turn a full disk (``ENOSPC``, ``EDQUOT``) under a write of ``key`` into :class:`StorageFullError`
        naming the file and the repository (the local backend raises it itself, naming the exact file)."""
        try:
            yield
        except StorageFullError:
            raise
        except OSError as err:
            if err.errno in _FULL:
                raise StorageFullError(self.url, posixpath.join(self.root, key), err.errno) from err
            raise


@dataclass(frozen=True)
class _Lock:
    """The gc lock as read: its bytes (None when unreadable), the store's modification time of its last write
    or renewal, the holder's token and lease (the default lease when the content does not say)."""

    raw: bytes | None
    mtime: float
    token: str | None
    lease: float
    holder: str

    def age(self) -> float:
        return time.time() - self.mtime

    def stale(self) -> bool:
        """Whether its lease has run out: not renewed for ``lease`` seconds (plus the second to which some stores,
        S3 among them, round the modification time down)."""
        return self.age() > self.lease + _MTIME_RESOLUTION


def _parse_lock(raw: bytes | None) -> tuple[str | None, float, str]:
    """(token, lease, holder description) of a lock's bytes. Anything that is not a lock record of this version
    (empty, not JSON, ``[]``, ``null``, a number, a record without a valid lease) gets the default lease, so it is
    judged by its age alone; a claimed lease longer than the default is cut to it."""
    try:
        rec = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        rec = None
    if not isinstance(rec, dict):
        return None, LOCK_STALE_AFTER, ""
    token = rec.get("token")
    lease = rec.get("lease")
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not math.isfinite(lease) or lease <= 0:
        lease = LOCK_STALE_AFTER
    host, pid = rec.get("host"), rec.get("pid")
    holder = f"host {host}, pid {pid}" if isinstance(host, str) and isinstance(pid, int) else ""
    return (token if isinstance(token, str) else None), min(float(lease), LOCK_STALE_AFTER), holder


class _LockHolder:
    """This process's hold on the gc lock: taking it, renewing its lease, giving it back."""

    def __init__(self, repo: Repository, lease: float) -> None:
        self.repo = repo
        self.backend = repo.backend
        self.lease = lease
        self.token = uuid.uuid4().hex
        self.empty: tuple[int, int, int] | None = None  # the identity of an empty lock file (full disk)
        self.renewed = time.monotonic()  # when the last successful renewal (or the creation) started
        self.lost = ""
        self.error: BaseException | None = None  # the last failure to renew, for the message when it matters
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"version": 2, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": now, "lease": self.lease, "expires": now + self.lease}).encode()  # fmt: skip

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                return
            lock = self.repo._read_lock()
            if lock is not None and not lock.stale():
                raise RepositoryBusyError(self.repo._busy(lock))
            if lock is not None:
                self._remove_if_unchanged(lock)  # left by a gc that crashed: its lease ran out
        raise RepositoryBusyError(self.repo._busy())

    def _create(self) -> bool:
        started = time.monotonic()
        try:
            with self.repo._writing(_LOCK):
                created = self.backend.put_if_absent(_LOCK, self._record())
        except StorageFullError as err:
            created = self._create_empty(err)
        if created:
            self.renewed = started
        return created

    def _create_empty(self, full: StorageFullError) -> bool:
        """No room for the lock's record: on local disk, take the lock as an empty file (an inode, no data), whose
        lease is the default one (how every unreadable lock is judged), renewed by touching it."""
        backend = self.backend
        if not isinstance(backend, LocalBackend):
            raise full
        where = posixpath.join(self.repo.root, _LOCK)
        try:
            created = backend.create_empty(_LOCK)
        except StorageFullError as err:
            raise StorageFullError(self.repo.url, where, err.errno, hint=(
                "not even gc's lock fits (an empty file: no inodes left?): delete some file on that disk outside "
                f"the repository, then run `ckptkit gc {self.repo.url}`"
            )) from err  # fmt: skip
        if created:
            self.lease = LOCK_STALE_AFTER
            self.empty = backend.identity(_LOCK)
        return created

    def _remove_if_unchanged(self, lock: _Lock) -> None:
        again = self.repo._read_lock()
        if again is not None and again.raw == lock.raw and again.mtime == lock.mtime:
            try:
                self.backend.delete([_LOCK])
            except FileNotFoundError:
                pass  # another gc took it over first; the next attempt finds its lock
            except (IsADirectoryError, NotADirectoryError, PermissionError) as err:  # not a file, or not ours
                where = posixpath.join(self.repo.root, _LOCK)
                raise RepositoryBusyError(f"{where} is stale (its lease ran out) but gc cannot remove it "
                                          f"({type(err).__name__}: {err}); remove it by hand, then run gc again "
                                          "(saves are not blocked by it)") from err  # fmt: skip

    def owns(self) -> bool:
        """Whether the stored lock is still the one this holder created."""
        if self.empty is not None and isinstance(self.backend, LocalBackend):
            try:
                return self.backend.identity(_LOCK) == self.empty
            except FileNotFoundError:
                return False
        lock = self.repo._read_lock()
        return lock is not None and lock.token == self.token

    def renew(self) -> bool:
        """Renew the lease (local disk: touch the file, writing no data; elsewhere: rewrite the record); False,
        and the hold lost, when the lock is no longer this holder's (taken over, or removed by hand)."""
        with self._mutex:
            if self.lost:
                return False
            started = time.monotonic()
            if started - self.renewed > self.lease:
                self.lost = f"its lease was not renewed for {started - self.renewed:.0f}s (more than {self.lease:g}s)"
                return False
            if not self.owns():
                self.lost = "the lock was taken over or removed"
                return False
            if isinstance(self.backend, LocalBackend):
                self.backend.touch(_LOCK)
            else:
                self.backend.put([(_LOCK, [memoryview(self._record())])])
            self.renewed = started
            return True

    def check(self) -> None:
        """Raise unless the lock is still this holder's and its lease surely holds (renewing it now if the
        background renewal has not for half of it). Called before every batch of deletes."""
        if not self.lost and time.monotonic() - self.renewed > self.lease / 2:
            try:
                self.renew()
            except Exception as err:  # a failing store: judged just below, by how long ago the last renewal was
                self.error = err
            if not self.lost and time.monotonic() - self.renewed > self.lease / 2:
                why = f": {type(self.error).__name__}: {self.error}" if self.error is not None else ""
                self.lost = f"its lease could not be renewed for half of it{why}"
        if not self.lost and not self.owns():  # one read per batch of deletes: a lock taken over stops it at once
            self.lost = "the lock was taken over or removed"
        if self.lost:
            raise RepositoryBusyError(
                f"gc stopped: it lost {posixpath.join(self.repo.root, _LOCK)} ({self.lost}); what it deleted "
                f"was garbage; run gc again"
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._keep, name="ckptkit-gc-lease", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        interval = max(self.lease / 6, 0.02)
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception as err:  # a failing store: check() stops the sweep if this lasts half the lease
                self.error = err

    def release(self, quiet: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with self._mutex:
                if not self.lost and self.owns():
                    self.backend.delete([_LOCK])
        except Exception:
            if not quiet:
                raise  # the lock stays until its lease runs out


def _parse_config(raw: bytes, where: str) -> str | None:
    """The codec a repository's config record names (None: raw); anything else is a ``ManifestError``."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ManifestError(where, f"not JSON ({err}); remove it and configure the repository again") from err
    codec = rec.get("codec") if isinstance(rec, dict) else ...
    if codec is not None and (not isinstance(codec, str) or not _CODEC_NAME.fullmatch(codec)):
        raise ManifestError(where, f"expected a record {{\"codec\": name or null}}, found {raw[:100]!r}; remove it "
                            "and configure the repository again")  # fmt: skip
    return codec


def _children(entries: list[Entry], prefix: str) -> list[Entry]:
    """The entries directly under ``prefix/`` (not in a folder below it)."""
    return [e for e in entries if "/" not in e.key[len(prefix) + 1 :]]
