"""A repository of checkpoints on any fsspec URL: content-addressed objects, manifests committed last.

Layout::

    <repo>/objects/<aa>/<hash>          immutable objects, named by the blake3 of their bytes
    <repo>/checkpoints/<name>.json      manifests; a manifest's presence is the commit
    <repo>/pending/<token>.json         objects an in-flight save will reference (protects them from gc)
    <repo>/gc.lock                      held while gc deletes

This layer moves bytes; it never sees tensors.

Commit: on local disk a manifest is written to a temporary file, fsync'd and hard-linked into place (atomic,
and it never replaces a committed checkpoint); on object stores it is one PUT, which is atomic there (on S3 a
conditional PUT, ``If-None-Match: *``, so that a committed checkpoint is never replaced there either).

Object stores: every object is written with one PUT of complete bytes (on S3, objects larger than ``part_size``
go up as a multipart upload, which becomes visible only when it completes, and is aborted when the upload
fails), so an object under its final name is never partial. Directory listings are never served from fsspec's
listing cache: other processes (a concurrent save, gc) change the repository behind this one's back.

gc and concurrent saves: a save first records the hashes it will reference in ``pending/``, then waits while
``gc.lock`` exists, then checks which objects exist. gc takes the lock before it reads ``pending/``. So either
gc sees the save's pending record and keeps its objects, or the save sees the lock and only checks for
existing objects after gc has finished deleting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import posixpath
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from ckptkit.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptkitError,
    CorruptObjectError,
    RepositoryBusyError,
)
from ckptkit.format import hash_bytes, hasher

_HASH = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STALE_AFTER = 6 * 3600.0
"""Seconds after which a pending record is taken to belong to a crashed save."""
MIB = 1 << 20
DEFAULT_PART_SIZE = 8 * MIB
"""S3: objects larger than this are uploaded in parts of this size (S3 allows 5 MiB to 5 GiB per part)."""
DEFAULT_MAX_CONCURRENCY = 8
"""S3: parts of one object in flight at once (memory held: about ``part_size * max_concurrency``)."""
_S3_MIN_PART = 5 * MIB
_S3_MAX_PART = 5 << 30
_S3_MAX_PARTS = 10_000
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
        max_concurrency: S3 only: how many parts of one object are uploaded at once. Default 8.

    Raises:
        ValueError: ``part_size`` or ``max_concurrency`` out of range, or given for a repository that is not on
            S3 (they would have no effect there).

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
            raise ValueError(f"repository URL must be a non-empty string or path, got {url!r}")
        self.url = url
        options = dict(storage_options or {})
        if options.get("use_listings_cache"):
            raise ValueError("storage_options: use_listings_cache=True is not supported: a repository must see "
                             "what other processes wrote, so it never lists from a cache")  # fmt: skip
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
            cache = getattr(fs, "dircache", None)
            if not isinstance(fs, LocalFileSystem) and getattr(cache, "use_listings_cache", False):
                fs, root = fsspec.core.url_to_fs(url, **options, use_listings_cache=False)
        except ImportError as err:
            proto = url.split("://", 1)[0]
            raise CkptkitError(
                f"cannot open {url}: the fsspec backend for {proto}:// is not installed ({err}); "
                f"for S3 install `ckptkit[s3]`"
            ) from err
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/") or "/"
        self.local = isinstance(fs, LocalFileSystem)
        self.s3 = _is_s3(fs)
        self._lock_time = time.monotonic()
        if self.local:
            self.root = os.path.abspath(self.root)
        if not self.s3 and (part_size is not None or max_concurrency is not None):
            raise ValueError(
                f"part_size and max_concurrency apply to S3 repositories (s3://...); {url} is on "
                f"{type(fs).__name__}, which would ignore them"
            )
        self.part_size = DEFAULT_PART_SIZE if part_size is None else part_size
        self.max_concurrency = DEFAULT_MAX_CONCURRENCY if max_concurrency is None else max_concurrency
        if not _is_int(self.part_size) or not _S3_MIN_PART <= self.part_size <= _S3_MAX_PART:
            raise ValueError(f"part_size={part_size!r}: S3 parts are 5 MiB ({_S3_MIN_PART}) to 5 GiB ({_S3_MAX_PART})")
        if not _is_int(self.max_concurrency) or self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency!r}: must be a positive integer")

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
        """Whether the object exists (stored objects are never partial: renamed into place on local disk,
        written with one PUT or a completed multipart upload on object stores)."""
        return bool(self.fs.exists(self.object_path(h)))

    def missing_objects(self, hashes: Iterable[str]) -> list[str]:
        """The hashes among ``hashes`` with no stored object, in order (on S3 the HEADs run concurrently)."""
        hs = list(hashes)
        if not self.s3 or len(hs) < 2:
            return [h for h in hs if not self.has_object(h)]

        async def heads() -> list[bool]:
            slots = asyncio.Semaphore(max(self.max_concurrency, 8))

            async def one(h: str) -> bool:
                async with slots:
                    return bool(await self.fs._exists(self.object_path(h)))

            return list(await asyncio.gather(*(one(h) for h in hs)))

        exists = sync(self.fs.loop, heads)
        return [h for h, e in zip(hs, exists, strict=True) if not e]

    def write_object(self, h: str, chunks: Iterable[memoryview]) -> int:
        """Store an object under its hash. The caller computed ``h`` over ``chunks``; returns bytes written."""
        path = self.object_path(h)
        if self.local:
            return self._write_local(path, chunks, replace=True)
        if self.s3:
            return self._write_s3_many([(path, [memoryview(c).cast("B") for c in chunks])])
        # One PUT of the complete bytes: streaming through fs.open() would, on an error mid-way, close the file
        # and so store a truncated object under the hash of the whole one.
        data = b"".join(chunks)
        self.fs.pipe_file(path, data)
        return len(data)

    # --- S3 ------------------------------------------------------------------------------------------------

    def _s3_call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, **kwargs)

    def _write_s3_many(self, objects: list[tuple[str, list[memoryview]]]) -> int:
        """Upload objects with at most ``max_concurrency`` requests in flight across all of them: one PUT for an
        object up to ``part_size``, a multipart upload above (the object appears only when its upload
        completes). On any error every upload this call started and did not complete is aborted."""
        future = asyncio.run_coroutine_threadsafe(self._s3_upload_all(objects), self.fs.loop)
        try:
            return int(future.result())
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt here: the uploads are cancelled and aborted on the loop
            with contextlib.suppress(BaseException):
                concurrent.futures.wait([future], timeout=60)
            raise

    async def _s3_upload_all(self, objects: list[tuple[str, list[memoryview]]]) -> int:
        slots = asyncio.Semaphore(self.max_concurrency)  # wakes waiters in order: objects finish roughly in order
        open_uploads: dict[str, tuple[str, str]] = {}  # upload id -> (bucket, key), until completed
        tasks = [asyncio.ensure_future(self._s3_upload_one(path, views, slots, open_uploads))
                 for path, views in objects]  # fmt: skip
        try:
            return sum(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for upload, (bucket, key) in open_uploads.items():
                with contextlib.suppress(Exception):  # the original error matters; gc aborts what this leaves
                    await self.fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
            raise

    async def _s3_upload_one(self, path: str, views: list[memoryview], slots: asyncio.Semaphore,
                             open_uploads: dict[str, tuple[str, str]]) -> int:  # fmt: skip
        bucket, key, _ = self.fs.split_path(path)
        size = sum(len(v) for v in views)
        if size <= self.part_size:
            async with slots:
                await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=b"".join(views))
            return size
        part = max(self.part_size, math.ceil(size / _S3_MAX_PARTS))
        async with slots:
            upload = (await self.fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key))["UploadId"]
        open_uploads[upload] = (bucket, key)

        async def send(n: int, start: int) -> dict[str, Any]:
            async with slots:
                body = _slice(views, start, min(size, start + part))  # one part's copy, only while in flight
                out = await self.fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=n,
                                             Body=body)  # fmt: skip
            checksums = {k: v for k, v in out.items() if k.startswith("Checksum") and k != "ChecksumType"}
            return {"PartNumber": n, "ETag": out["ETag"], **checksums}

        sends = [asyncio.ensure_future(send(n, start)) for n, start in enumerate(range(0, size, part), start=1)]
        try:
            parts = await asyncio.gather(*sends)
        except BaseException:
            for t in sends:
                t.cancel()
            await asyncio.gather(*sends, return_exceptions=True)
            raise
        async with slots:
            await self.fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload,
                                   MultipartUpload={"Parts": parts})  # fmt: skip
        del open_uploads[upload]
        return size

    def _s3_commit(self, path: str, manifest: bytes) -> bool:
        """PUT the manifest only if no object has its name; False when one has (``If-None-Match: *``)."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            self._s3_call("put_object", Bucket=bucket, Key=key, Body=manifest, IfNoneMatch="*")
        except FileExistsError:
            return False
        except OSError as err:
            code, status = _s3_error(err)
            if code == "PreconditionFailed" or status == 412:
                return False
            if code in ("NotImplemented", "InvalidArgument") or status == 501:
                # A server without conditional writes: the existence check before this is what protects.
                self._s3_call("put_object", Bucket=bucket, Key=key, Body=manifest)
                return True
            raise
        return True

    def _s3_stale_uploads(self, dry_run: bool) -> int:
        """Abort multipart uploads under ``objects/`` older than :data:`STALE_AFTER` (left by killed saves;
        S3 keeps, and bills, their parts until they are aborted). Returns how many."""
        bucket, prefix, _ = self.fs.split_path(self._p("objects"))
        prefix = prefix.rstrip("/") + "/"
        now = time.time()
        stale: list[tuple[str, str]] = []
        markers: dict[str, str] = {}
        while True:
            page = self._s3_call("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            for u in page.get("Uploads", []):
                initiated = u.get("Initiated")
                if initiated is not None and now - initiated.timestamp() > STALE_AFTER:
                    stale.append((u["Key"], u["UploadId"]))
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}
        if not dry_run:
            for k, upload in stale:
                with contextlib.suppress(FileNotFoundError):
                    self._s3_call("abort_multipart_upload", Bucket=bucket, Key=k, UploadId=upload)
        return len(stale)

    def _write_local(self, path: str, chunks: Iterable[memoryview], replace: bool) -> int:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = _write_all(fd, chunks)
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

    def read_object(self, h: str, size: int | None = None) -> memoryview:
        """Read an object and verify its hash (and size, when known); a writable buffer of its bytes.

        Raises:
            FileNotFoundError: the object does not exist.
            CorruptObjectError: its bytes do not hash to ``h``.
        """
        path = self.object_path(h)
        if self.local:
            buf, found = _read_local(path)
        else:
            buf = memoryview(bytearray(self.fs.cat_file(path)))
            found = hash_bytes(buf)
        if size is not None and len(buf) != size:
            raise CorruptObjectError(path, f"{size} bytes", f"{len(buf)} bytes", "size differs")
        if found != h:
            raise CorruptObjectError(path, h, found)
        return buf

    def write_objects(self, objects: list[tuple[str, Iterable[memoryview]]]) -> int:
        """Store several objects; on local disk each one's fsync overlaps the writing of the next.

        An object appears under its final name only after its bytes are on disk, so a crash at any moment
        leaves complete objects and temporary files (removed by gc), never a partial object.
        """
        if self.s3:
            return self._write_s3_many([(self.object_path(h), [memoryview(c).cast("B") for c in chunks])
                                        for h, chunks in objects])  # fmt: skip
        if not self.local:
            return sum(self.write_object(h, chunks) for h, chunks in objects)
        written = 0
        staged: list[tuple[str, str]] = []
        syncer = _Fsyncer()  # a plain thread: concurrent.futures refuses new work at interpreter exit
        try:
            for h, chunks in objects:
                path = self.object_path(h)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                staged.append((tmp, path))
                try:
                    written += _write_all(fd, chunks)
                except BaseException:
                    os.close(fd)
                    raise
                syncer.put(fd)
            syncer.finish()  # every object is on disk before any gets its final name
            for tmp, path in staged:
                os.replace(tmp, path)
        except BaseException:
            syncer.finish(raise_errors=False)
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
        for d in sorted({os.path.dirname(p) for _, p in staged}):
            _fsync_dir(d)
        return written

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
        if not self._create_exclusive(self.manifest_path(name), manifest):
            raise CheckpointExistsError(self.url, name)

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
            if not self.local and not self.fs.exists(path):
                raise FileNotFoundError(path)  # an object store deletes a missing key without complaint
            self.fs.rm_file(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.url, name, self.list()) from None

    def archive(self, manifest_id: str, manifest: bytes) -> None:
        """Keep a pruned checkpoint's manifest under ``lineage/<id>.json`` so its history stays readable (its
        objects are still collected by gc; archived manifests reference nothing)."""
        if not _HASH.match(manifest_id):
            raise ValueError(f"invalid manifest id {manifest_id!r}")
        self._put_small(self._p("lineage", f"{manifest_id}.json"), manifest)

    def read_archived(self, manifest_id: str) -> bytes | None:
        """An archived manifest's bytes, or None."""
        if not _HASH.match(manifest_id):
            raise ValueError(f"invalid manifest id {manifest_id!r}")
        try:
            return bytes(self.fs.cat_file(self._p("lineage", f"{manifest_id}.json")))
        except FileNotFoundError:
            return None

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
            if e.get("type") == "directory":
                continue
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
        busy = f"another gc holds {path}; wait for it, or delete the file if it crashed"
        if self._gc_lock_held():
            raise RepositoryBusyError(busy)
        self._lock_time = time.monotonic()
        if not self._create_exclusive(path, self._lock_owner()):  # two gcs that both saw no lock: one wins
            raise RepositoryBusyError(busy)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def _lock_owner(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()

    def _refresh_lock(self) -> None:
        self._lock_time = time.monotonic()
        self._put_small(self._p("gc.lock"), self._lock_owner())

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Write a small file only if nothing has its name (atomic on local disk and on S3 servers with
        conditional writes; elsewhere a check before the write); False when something has."""
        if self.local:
            try:
                self._write_local(path, [memoryview(data)], replace=False)
            except FileExistsError:
                return False
            return True
        if self.fs.exists(path):
            return False
        if self.s3:
            return self._s3_commit(path, data)
        self.fs.pipe_file(path, data)
        return True

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
        now = time.time()
        if self.local:  # temp files of writes that crashed, wherever a write makes them
            for sub in ("objects", "checkpoints", "pending", "lineage"):
                for dirpath, _, files in os.walk(self._p(sub)):
                    for f in files:
                        p = os.path.join(dirpath, f)
                        if f.startswith(".tmp-") and now - os.path.getmtime(p) > STALE_AFTER:
                            temps += 1
                            if not dry_run:
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(p)
        with contextlib.suppress(FileNotFoundError):  # pending records of saves that crashed protect nothing
            for e in self.fs.ls(self._p("pending"), detail=True):
                if e.get("type") == "file" and now - _mtime(e) > STALE_AFTER:
                    temps += 1
                    if not dry_run:
                        with contextlib.suppress(FileNotFoundError):
                            self.fs.rm_file(e["name"])
        if self.s3:
            temps += self._s3_stale_uploads(dry_run)
        return GcReport(len(stored) - removed, removed, freed, temps, dry_run)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_s3(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols and hasattr(fs, "_call_s3") and hasattr(fs, "split_path")


def _slice(views: list[memoryview], start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    offset = 0
    for v in views:
        lo, hi = max(start - offset, 0), min(end - offset, len(v))
        if lo < hi:
            out.append(v[lo:hi])
        offset += len(v)
        if offset >= end:
            break
    return b"".join(out)


def _s3_error(err: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind an s3fs error (botocore's ClientError is its cause)."""
    cause = err.__cause__
    response = getattr(cause, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), (int(status) if status is not None else None)


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


READ_CHUNK = 8 << 20


def _read_local(path: str) -> tuple[memoryview, str]:
    """Read a file into an uninitialised buffer, hashing each chunk right after it is read (one pass over
    memory; a zero-filled bytearray would cost a second one)."""
    with open(path, "rb", buffering=0) as f:
        n = os.fstat(f.fileno()).st_size
        array: Any = np.empty(n, dtype=np.uint8)
        view = memoryview(array).cast("B")
        h = hasher(n)
        got = 0
        while got < n:
            k = f.readinto(view[got : got + READ_CHUNK])
            if not k:
                break  # the file shrank while we read: the size check reports it
            h.update(view[got : got + k])
            got += k
    return view[:got], str(h.hexdigest())


def _write_all(fd: int, chunks: Iterable[memoryview]) -> int:
    size = 0
    for c in chunks:
        view = memoryview(c).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
            size += n
    return size


class _Fsyncer:
    """fsyncs and closes file descriptors on a background thread, in order, while the caller writes the next."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckptkit-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (fd := self._queue.get()) is not None:
            try:
                if self._error is None:
                    os.fsync(fd)
            except BaseException as err:
                self._error = err
            finally:
                os.close(fd)

    def put(self, fd: int) -> None:
        self._queue.put(fd)

    def finish(self, raise_errors: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if raise_errors and self._error is not None:
            raise self._error


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
