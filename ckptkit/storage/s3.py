"""The S3 backend: concurrent uploads under one request budget, multipart above ``part_size``, conditional commits,
and a deadline on every request.

Upload: :meth:`S3Backend.put` uploads every object of a call on s3fs's event loop with at most
``max_concurrency`` requests in flight across all of them: one PUT for an object up to ``part_size``, a
multipart upload above (which becomes visible only when it completes). On any error, or when the caller is
interrupted, every upload the call started and did not complete is aborted, so an object under its final key is
never partial (and what an abort misses, e.g. after SIGKILL, gc aborts once stale: S3 keeps, and bills, the
parts of an incomplete upload until then). A completion whose answer was lost, and that botocore therefore
retried into ``NoSuchUpload``, is recognised by the object's multipart ETag and counts as done. A request's body
is views of the caller's buffers (no copy), streamed to aiohttp a MiB at a time; its CRC32 and, over plain HTTP
where SigV4 signs the payload, its SHA-256 are computed on worker threads and handed to botocore (a signer that
takes a precomputed digest, see :func:`_take_digests`), which would otherwise compute them on s3fs's loop thread.
Objects given as a generator are uploaded while it produces the next ones (see :meth:`S3Backend.put`).

Commit: :meth:`S3Backend.put_if_absent` is a conditional PUT (``If-None-Match: *``): of two writers racing for
one key, the server lets only the first one in (412 for the other). A server without conditional writes
(501 / NotImplemented) gets a plain PUT; the existence check before it is then what protects. A 412 is not
taken at its word: when the response to our own PUT was lost and botocore retried it, the retry meets the
object that the first attempt stored. So on a 412 the stored object is read back, and if it holds exactly our
bytes the commit succeeded.

Existence: :meth:`S3Backend.missing` and :meth:`S3Backend.delete` run their HEADs and DELETEs concurrently (one
HEAD per key: a key is never a folder).

Reads: :meth:`S3Backend.get` reads an object with concurrent ranged GETs of ``read_part_size`` bytes into one
buffer of fresh (untouched) memory, at most ``read_concurrency`` GETs in flight across every read of the backend
(the reads of a restore share the budget, so parts are fetched roughly in object order). The first GET, of the
first part, tells the object's size (``Content-Range``): an object larger than ``max_size`` is refused before any
body is read, and the other parts (``If-Match`` the first answer's ETag, so no part comes from another version)
are requested while the first one streams in. The caller's thread hashes (blake3) the buffer from its start as
far as every byte has arrived, while the parts are still arriving, so the digest is ready when the last byte is.
Each part is exactly the range asked: one whose connection breaks mid-body is resumed with a ranged GET from its
first missing byte, a few times, before the read fails; it is never returned short.

Deadlines and errors: every request runs under a deadline of ``timeout`` seconds plus a second per MiB it
carries (a ranged GET: per MiB of its range, resumes included), s3fs's and botocore's retries included; past it the call
raises :class:`~ckptkit.errors.StorageTimeoutError`. Any other failure of the store (a connection refused or
cut, a truncated body, an error status) raises :class:`~ckptkit.errors.StorageError` naming the repository,
the action and the key, with the library's exception as its cause; a missing key stays a
``FileNotFoundError``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import math
import mmap
import threading
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ckptkit.errors import CkptkitError, CorruptObjectError, InvalidArgumentError, StorageError, StorageTimeoutError
from ckptkit.hashing import hasher
from ckptkit.storage.backend import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_PART_SIZE,
    DEFAULT_READ_CONCURRENCY,
    DEFAULT_READ_PART_SIZE,
    DEFAULT_TIMEOUT,
    MIB,
    Entry,
    is_s3_filesystem,
)
from ckptkit.storage.fsspec_backend import FsspecBackend

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "DEFAULT_READ_CONCURRENCY",
    "DEFAULT_READ_PART_SIZE",
    "DEFAULT_TIMEOUT",
    "SECONDS_PER_MIB",
    "S3Backend",
]

SECONDS_PER_MIB = 1.0
"""A request's deadline grows by this much per MiB it carries (so ``timeout`` need not scale with part size)."""
_MIN_PART = 5 * MIB
_MAX_PART = 5 << 30
_MAX_PARTS = 10_000
_MIN_LOOKUPS = 8  # HEADs and DELETEs in flight at once, at least (they hold no memory)
_READ_ATTEMPTS = 3  # GETs of one object, the first and the ranged ones that resume a body cut short
_READ_CHUNK = 1 << 20  # bytes asked of a body at once where it cannot hand over what it has buffered
_MIN_READ_PART = 1 * MIB
_HASH_STEP = 4 * MIB  # the caller's thread hashes once this much more has arrived (or the read is done)
_HUGE_PAGES_FROM = 4 * MIB
_CANCEL_WAIT = 60.0  # seconds an interrupted call waits for its requests to be cancelled and aborted
_BODY_WORKERS = 4  # threads that checksum upload bodies (hashlib and zlib release the GIL)
_UPLOAD_AHEAD = 2  # a lazy put's producer runs at most this many budgets (concurrency x part size) ahead
_SEND_CHUNK = 1 << 20  # an upload's body is handed to aiohttp in views of this many bytes
_SIGNER = "ckptkit-s3v4"  # botocore's s3v4, taking a body's SHA-256 from :class:`_Body` when it carries one
_TIMEOUT_ERRORS = ("ConnectTimeoutError", "ReadTimeoutError", "FSTimeoutError")  # botocore's, fsspec's

_T = TypeVar("_T")


class S3Backend(FsspecBackend):
    """A :class:`~ckptkit.storage.backend.Backend` on S3 through s3fs (``fs`` an ``S3FileSystem``).

    Args:
        fs: the s3fs filesystem.
        root: ``bucket/prefix`` that keys are relative to.
        part_size: objects larger than this many bytes are uploaded in parts of this size (5 MiB to 5 GiB;
            raised for an object that would otherwise need more than 10,000 parts).
        max_concurrency: requests (parts, or whole small objects) in flight at once across one :meth:`put`.
        timeout: the deadline of each request in seconds, retries included, plus :data:`SECONDS_PER_MIB` per
            MiB it carries (see the module docstring).
        read_part_size: objects are read in ranged GETs of this many bytes (1 MiB to 5 GiB).
        read_concurrency: ranged GETs in flight at once across every read of this backend (memory held by them:
            the objects being read, which a restore keeps anyway).

    Raises:
        InvalidArgumentError: ``part_size``, ``max_concurrency``, ``timeout``, ``read_part_size`` or
            ``read_concurrency`` out of range.
    """

    kind = "s3"

    def __init__(
        self,
        fs: Any,
        root: str,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT,
        read_part_size: int = DEFAULT_READ_PART_SIZE,
        read_concurrency: int = DEFAULT_READ_CONCURRENCY,
    ) -> None:
        super().__init__(fs, root)
        if not _is_int(part_size) or not _MIN_PART <= part_size <= _MAX_PART:
            raise InvalidArgumentError(f"part_size={part_size!r}: S3 parts are 5 MiB ({_MIN_PART}) to 5 GiB "
                                       f"({_MAX_PART})")  # fmt: skip
        if not _is_int(max_concurrency) or max_concurrency < 1:
            raise InvalidArgumentError(f"max_concurrency={max_concurrency!r}: must be a positive integer")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise InvalidArgumentError(f"timeout={timeout!r}: must be a positive, finite number of seconds")
        if not _is_int(read_part_size) or not _MIN_READ_PART <= read_part_size <= _MAX_PART:
            raise InvalidArgumentError(f"read_part_size={read_part_size!r}: ranged reads are 1 MiB ({_MIN_READ_PART}) "
                                       f"to 5 GiB ({_MAX_PART}); 64 MiB is a good start")  # fmt: skip
        if not _is_int(read_concurrency) or read_concurrency < 1:
            raise InvalidArgumentError(f"read_concurrency={read_concurrency!r}: must be a positive integer "
                                       "(ranged GETs in flight at once)")  # fmt: skip
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.read_part_size = read_part_size
        self.read_concurrency = read_concurrency
        self._read_slots: asyncio.Semaphore | None = None  # made on s3fs's loop, shared by every read
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None  # upload bodies (see _body)
        self.url = f"s3://{root}"

    @staticmethod
    def supports(fs: Any) -> bool:
        """Whether ``fs`` is an s3fs filesystem (one with the async S3 calls this backend uses)."""
        return is_s3_filesystem(fs)

    # --- the boundary: deadlines, and typed errors -----------------------------------------------------------

    def _run(
        self,
        coro: Coroutine[Any, Any, _T],
        action: str,
        key: str | None,
        follow: Callable[[concurrent.futures.Future[_T]], None] | None = None,
    ) -> _T:
        """Run ``coro`` on s3fs's loop and wait for it; its requests carry their own deadlines. ``follow(future)``,
        when given, works on this thread while it runs (a read's hashing) and returns once it is done. On an
        interrupt (e.g. KeyboardInterrupt) it is cancelled (a put's uploads aborted) before the interrupt
        propagates."""
        future = asyncio.run_coroutine_threadsafe(coro, self.fs.loop)
        try:
            if follow is not None:
                follow(future)
            return future.result()
        except (CkptkitError, FileNotFoundError):
            raise
        except _ProducerFailed as failed:  # the caller's generator of objects raised: its error, as it is
            raise failed.error from failed.error.__cause__
        except Exception as err:  # anything the requests' own guards did not name
            raise self._error(err, action, key, None) from err
        except BaseException:
            future.cancel()  # the uploads are cancelled and aborted on the loop
            with contextlib.suppress(BaseException):
                concurrent.futures.wait([future], timeout=_CANCEL_WAIT)
            raise

    def _error(self, err: BaseException, action: str, key: str | None, elapsed: float | None) -> StorageError:
        """The typed error for a failure of the store (``err`` becomes its cause)."""
        names = {c.__name__ for c in type(err).__mro__}
        if isinstance(err, asyncio.TimeoutError) or names & set(_TIMEOUT_ERRORS):
            return StorageTimeoutError(self.url, action, key, self.timeout if elapsed is None else elapsed,
                                       f"{type(err).__name__}: {err}" if str(err) else "")  # fmt: skip
        return StorageError(self.url, action, key, f"{type(err).__name__}: {err}")

    async def _guard(self, action: str, key: str | None, aw: Awaitable[_T]) -> _T:
        """Await ``aw``; a failure of the store becomes a typed error naming ``action`` and ``key``."""
        start = time.monotonic()
        try:
            return await aw
        except (CkptkitError, FileNotFoundError):
            raise
        except Exception as err:
            raise self._error(err, action, key, time.monotonic() - start) from err

    def _deadline(self, nbytes: int = 0) -> float:
        return self.timeout + SECONDS_PER_MIB * nbytes / MIB

    def _raw(self, method: str, nbytes: int = 0, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """One S3 call (s3fs's and botocore's retries included) under its deadline; errors as they come."""
        return asyncio.wait_for(self.fs._call_s3(method, **kwargs), self._deadline(nbytes))

    def _request(
        self, action: str, key: str | None, method: str, nbytes: int = 0, **kwargs: Any
    ) -> Coroutine[Any, Any, Any]:
        """One S3 call under its deadline, with typed errors."""
        return self._guard(action, key, self._raw(method, nbytes, **kwargs))

    def _split(self, key: str) -> tuple[str, str]:
        bucket, s3key, _ = self.fs.split_path(self.path(key))
        return str(bucket), str(s3key)

    # --- writes ------------------------------------------------------------------------------------------------

    def put(self, objects: Iterable[tuple[str, Iterable[memoryview]]]) -> int:
        """Upload objects concurrently (see the module docstring); an object appears only once complete.

        ``objects`` may be produced lazily (a generator that encodes them, say): it is then advanced on a worker
        thread while the objects it already gave are uploading, and no further than :data:`_UPLOAD_AHEAD` part
        budgets ahead of the uploads (the bytes it hands over stay in memory until their upload is done)."""
        if isinstance(objects, (list, tuple)):
            key = objects[0][0] if len(objects) == 1 else None
            return int(self._run(self._upload_all(iter(objects), False), "saving", key))
        return int(self._run(self._upload_all(iter(objects), True), "saving", None))

    async def _upload_all(self, objects: Iterator[tuple[str, Iterable[memoryview]]], lazy: bool) -> int:
        slots = asyncio.Semaphore(self.max_concurrency)  # wakes waiters in order: objects finish roughly in order
        open_uploads: dict[str, tuple[str, str]] = {}  # upload id -> (bucket, key), until completed
        tasks: list[asyncio.Future[int]] = []
        ahead = _UPLOAD_AHEAD * self.max_concurrency * self.part_size  # bytes handed over and not yet uploaded
        held = 0
        room = asyncio.Event()
        sums = await self._checksums()  # once per put: every key is in the repository's bucket

        def done(size: int) -> Callable[[asyncio.Future[int]], None]:
            def release(_: asyncio.Future[int]) -> None:
                nonlocal held
                held -= size
                room.set()

            return release

        try:
            while True:
                if lazy:
                    while held >= ahead and _failed(tasks) is None:
                        room.clear()
                        await room.wait()
                    failed = _failed(tasks)
                    if failed is not None:  # a failed upload stops the producer at once
                        await failed
                    item = await asyncio.get_running_loop().run_in_executor(self._pool(), _pull, objects)
                else:
                    item = next(objects, None)
                if item is None:
                    break
                key, chunks = item
                views = [memoryview(c).cast("B") for c in chunks]
                size = sum(len(v) for v in views)
                task = asyncio.ensure_future(self._upload_one(key, views, slots, open_uploads, sums))
                held += size
                task.add_done_callback(done(size))
                tasks.append(task)
            return sum(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # The original error matters; what an abort misses (a stalled endpoint) gc aborts once stale.
            aborts = [self._raw("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
                      for upload, (bucket, key) in open_uploads.items()]  # fmt: skip
            await asyncio.gather(*aborts, return_exceptions=True)
            raise

    async def _upload_one(self, key: str, views: list[memoryview], slots: asyncio.Semaphore,
                          open_uploads: dict[str, tuple[str, str]], sums: tuple[bool, bool]) -> int:  # fmt: skip
        bucket, s3key = self._split(key)
        size = sum(len(v) for v in views)
        if size <= self.part_size:
            async with slots:
                body, extra = await self._body(views, 0, size, sums)
                await self._request("saving", key, "put_object", size, Bucket=bucket, Key=s3key, Body=body, **extra)
            return size
        part = max(self.part_size, math.ceil(size / _MAX_PARTS))
        async with slots:
            created = await self._request("saving", key, "create_multipart_upload", Bucket=bucket, Key=s3key)
        upload = created["UploadId"]
        open_uploads[upload] = (bucket, s3key)
        count = math.ceil(size / part)

        async def send(n: int, start: int) -> dict[str, Any]:
            async with slots:
                body, extra = await self._body(views, start, min(size, start + part), sums)  # only while in flight
                out = await self._request(f"saving (part {n} of {count})", key, "upload_part", len(body), Bucket=bucket,
                                          Key=s3key, UploadId=upload, PartNumber=n, Body=body, **extra)  # fmt: skip
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
            try:
                await self._request("saving (completing the upload)", key, "complete_multipart_upload", size,
                                    Bucket=bucket, Key=s3key, UploadId=upload,
                                    MultipartUpload={"Parts": parts})  # fmt: skip
            except FileNotFoundError as err:  # NoSuchUpload: completed by an attempt whose answer was lost?
                if not await self._completed(key, parts):
                    raise StorageError(self.url, "saving", key, "the multipart upload vanished before it was "
                                       "completed (aborted by another process?)") from err  # fmt: skip
        del open_uploads[upload]
        return size

    async def _checksums(self) -> tuple[bool, bool]:
        """What botocore would compute over every upload's body on s3fs's loop, which :meth:`_body` computes on a
        worker thread instead: (the body's SHA-256, which SigV4 signs over a plain-HTTP endpoint; its CRC32, sent
        by default). The client learns to take a precomputed SHA-256 here (:func:`_take_digests`)."""
        await self.fs.set_session()  # as every s3fs call does first (a no-op once it has its client)
        client = await self.fs.get_s3(self.fs.split_path(self.root)[0])
        _take_digests(client)
        config = client.meta.config
        crc = getattr(config, "request_checksum_calculation", "when_supported") == "when_supported"
        signing = (getattr(config, "s3", None) or {}).get("payload_signing_enabled")
        sha = signing is True or (signing is None and not str(client.meta.endpoint_url).startswith("https"))
        return sha, crc

    async def _body(
        self, views: list[memoryview], start: int, end: int, sums: tuple[bool, bool]
    ) -> tuple[_Body, dict[str, str]]:
        """One request's body, bytes ``start:end`` of ``views`` (no copy), and its checksum parameters, computed on
        a worker thread: SHA-256 and CRC32 release the GIL there, where botocore would run them on s3fs's loop one
        part at a time (with its copies of the body, ~3 s of the loop thread per GiB saved)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool(), _make_body, views, start, end, *sums)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The worker threads of uploads: bodies' checksums (:meth:`_body`), a lazy ``put``'s producer."""
        if self._workers is None:
            self._workers = concurrent.futures.ThreadPoolExecutor(_BODY_WORKERS + 1, thread_name_prefix="ckptkit-s3")
        return self._workers

    async def _completed(self, key: str, parts: list[dict[str, Any]]) -> bool:
        """Whether ``key`` holds the object that completing an upload of ``parts`` makes (by its ETag: the MD5 of
        the parts' MD5s, ``-`` their count, where the parts' ETags are MD5s)."""
        bucket, s3key = self._split(key)
        try:
            head = await self._request("saving", key, "head_object", Bucket=bucket, Key=s3key)
            digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
        except (FileNotFoundError, ValueError):
            return False
        expected = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"
        return str(head.get("ETag", "")).strip('"') == expected

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``) after an existence check; see the module docstring."""
        return bool(self._run(self._put_if_absent(key, data), "committing", key))

    async def _put_if_absent(self, key: str, data: bytes) -> bool:
        bucket, s3key = self._split(key)
        if await self._exists(key, "committing"):
            return False
        start = time.monotonic()
        try:
            await self._raw("put_object", len(data), Bucket=bucket, Key=s3key, Body=data, IfNoneMatch="*")
        except FileExistsError:
            return await self._holds(key, data)
        except (CkptkitError, FileNotFoundError):
            raise
        except Exception as err:
            code, status = _s3_error(err)
            if code == "PreconditionFailed" or status == 412:
                return await self._holds(key, data)
            if code in ("NotImplemented", "InvalidArgument") or status == 501:
                # A server without conditional writes: the existence check before this is what protects.
                await self._request("committing", key, "put_object", len(data), Bucket=bucket, Key=s3key, Body=data)
                return True
            raise self._error(err, "committing", key, time.monotonic() - start) from err
        return True

    async def _holds(self, key: str, data: bytes) -> bool:
        """Whether ``key`` holds exactly ``data``: after a 412, whether the conflicting object is our own (the
        answer to our first attempt was lost and the retry met what that attempt stored)."""
        try:
            stored = await self._read(key, len(data), "committing (reading back a conflicting object)", _Fill())
        except (FileNotFoundError, CorruptObjectError):  # gone again, or larger than ours: not ours
            return False
        return bytes(stored) == data

    # --- reads -------------------------------------------------------------------------------------------------

    def get(self, key: str, max_size: int | None = None) -> tuple[memoryview, str]:
        """The whole object and its blake3 digest, read with concurrent ranged GETs and hashed on this thread
        while they arrive (see the module docstring: bounded by ``max_size``, each part resumed when cut short)."""
        fill = _Fill()
        digest: list[str] = []

        def follow(future: concurrent.futures.Future[memoryview]) -> None:
            future.add_done_callback(lambda _: fill.wake.set())
            h: Any = None
            hashed = 0
            while True:
                fill.wake.wait()
                fill.wake.clear()
                done = future.done()
                if done and (future.cancelled() or future.exception() is not None):
                    return  # _run raises it
                view = fill.view
                if view is None:
                    continue
                if h is None:
                    h = hasher(len(view))
                frontier = fill.frontier  # bytes before it are final: written once, never again
                if frontier - hashed >= _HASH_STEP or (done and frontier > hashed):
                    h.update(view[hashed:frontier])
                    hashed = frontier
                if done:
                    if hashed != len(view):  # pragma: no cover (a read returns only once every part is complete)
                        raise StorageError(self.url, "reading", key, f"only {hashed} of {len(view)} bytes arrived")
                    digest.append(str(h.hexdigest()))
                    return

        view = self._run(self._read(key, max_size, "reading", fill), "reading", key, follow)
        return view, digest[0]

    def _slots(self) -> asyncio.Semaphore:
        """The read budget (on s3fs's loop): ``read_concurrency`` ranged GETs in flight, FIFO."""
        if self._read_slots is None:
            self._read_slots = asyncio.Semaphore(self.read_concurrency)
        return self._read_slots

    async def _read(self, key: str, max_size: int | None, action: str, fill: _Fill) -> memoryview:
        """Read the object under ``key`` into fresh memory with ranged GETs (see the module docstring); ``fill``
        follows the progress for a hashing thread."""
        bucket, s3key = self._split(key)
        where = _Where(self, action, key, bucket, s3key)
        slots = self._slots()
        part = self.read_part_size
        others: list[asyncio.Future[None]] = []
        try:
            async with slots:
                start = time.monotonic()
                resp, total, ranged = await self._first_get(where, part, max_size)
                view = memoryview(_fresh(total)).cast("B") if total else memoryview(bytearray())
                if not ranged:  # the whole object came (a server that ignores Range, or an empty object)
                    part = max(total, 1)
                fill.start(view, [(lo, min(lo + part, total)) for lo in range(0, total, part)])
                etag = resp.get("ETag")
                where.etag = str(etag) if etag else None
                others = [asyncio.ensure_future(self._part(where, fill, i, slots)) for i in range(1, len(fill.parts))]
                if total:
                    await self._fill_part(where, fill, 0, resp["Body"], start)
                else:
                    resp["Body"].close()
            await asyncio.gather(*others)
        except BaseException:
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            raise
        return view

    async def _first_get(self, where: _Where, part: int, max_size: int | None) -> tuple[dict[str, Any], int, bool]:
        """The GET of the first part, the object's size (refused, unread, when over ``max_size``), and whether the
        answer is that range (else it is the whole object)."""
        bucket, s3key, key, action = where.bucket, where.s3key, where.key, where.action
        try:
            # Its answer within ``timeout`` (its size is not known yet); its body then within the part's deadline.
            resp = await self._raw("get_object", Bucket=bucket, Key=s3key, Range=f"bytes=0-{part - 1}")
        except (CkptkitError, FileNotFoundError):
            raise
        except Exception as err:
            code, status = _s3_error(err)
            if code != "InvalidRange" and status != 416:
                raise self._error(err, action, key, None) from err
            # An empty object has no byte 0: read it whole (what it holds now, if it changed meanwhile).
            resp = await self._request(action, key, "get_object", Bucket=bucket, Key=s3key)
        n = int(resp["ContentLength"])
        content_range = str(resp.get("ContentRange") or "")
        total = n
        if content_range:  # "bytes 0-67108863/123456789"
            try:
                total = int(content_range.rsplit("/", 1)[1])
            except (IndexError, ValueError):
                total = -1
            if total < 0 or n != min(part, total):
                resp["Body"].close()
                raise StorageError(self.url, action, key, f"a ranged GET of bytes 0-{part - 1} answered {n} bytes "
                                   f"with Content-Range {content_range!r}")  # fmt: skip
        if max_size is not None and total > max_size:
            resp["Body"].close()
            raise CorruptObjectError(self.path(key), f"at most {max_size} bytes", f"{total} bytes",
                                     "larger than expected; not read")  # fmt: skip
        return resp, total, bool(content_range)

    async def _part(self, where: _Where, fill: _Fill, i: int, slots: asyncio.Semaphore) -> None:
        async with slots:
            await self._fill_part(where, fill, i, None, time.monotonic())

    async def _fill_part(self, where: _Where, fill: _Fill, i: int, body: Any, start: float) -> None:
        """Receive part ``i`` into ``fill`` (from ``body`` when its GET was made, else with a ranged GET of its
        own), resuming a body cut short from its first missing byte; within one deadline for the part."""
        action, key = where.action, where.key
        lo, hi = fill.parts[i]
        n = hi - lo
        count = len(fill.parts)
        what = action if count == 1 else f"{action} (part {i + 1} of {count})"
        end = start + self._deadline(n)
        problem = ""
        for attempt in range(1, _READ_ATTEMPTS + 1):
            if body is None:
                have = fill.got[i]
                ranged = await self._guard(what, key, asyncio.wait_for(
                    self.fs._call_s3("get_object", Bucket=where.bucket, Key=where.s3key,
                                     Range=f"bytes={lo + have}-{hi - 1}",
                                     **({"IfMatch": where.etag} if where.etag else {})),
                    max(end - time.monotonic(), 0.0)))  # fmt: skip
                body = ranged["Body"]
                if int(ranged["ContentLength"]) != n - have:
                    body.close()
                    raise StorageError(self.url, what, key, f"{problem}a ranged GET of bytes {lo + have}-{hi - 1} "
                                       f"answered {ranged['ContentLength']} bytes, not {n - have}")  # fmt: skip
            cause: BaseException | None = None
            try:
                await asyncio.wait_for(_drain(body, fill, i, where), max(end - time.monotonic(), 0.0))
            except asyncio.TimeoutError as err:
                raise StorageTimeoutError(self.url, what, key, time.monotonic() - start,
                                          f"{fill.got[i]} of {n} bytes received") from err  # fmt: skip
            except CkptkitError:
                raise
            except Exception as err:  # the connection broke mid-body (aiohttp's or botocore's error)
                cause = err
            finally:
                body.close()
                body = None
            if fill.got[i] == n:
                return
            problem = f"the response was cut short after {fill.got[i]} of {n} bytes"
            if cause is not None:
                problem += f" ({type(cause).__name__}: {cause})"
            if attempt == _READ_ATTEMPTS:
                raise StorageError(self.url, what, key, f"{problem}, {attempt} times") from cause
            problem += "; "

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return bytes(self._run(self._get_range(key, offset, length), "reading", key))

    async def _get_range(self, key: str, offset: int, length: int) -> bytes:
        bucket, s3key = self._split(key)
        try:
            resp = await self._raw("get_object", length, Bucket=bucket, Key=s3key,
                                   Range=f"bytes={offset}-{offset + length - 1}")  # fmt: skip
        except (CkptkitError, FileNotFoundError):
            raise
        except Exception as err:
            code, status = _s3_error(err)
            if code == "InvalidRange" or status == 416:
                return b""  # at or past the end
            raise self._error(err, "reading", key, None) from err
        body = resp["Body"]
        try:
            data: bytes = await self._guard("reading", key, asyncio.wait_for(body.read(), self._deadline(length)))
        finally:
            body.close()
        return data

    # --- lookups -----------------------------------------------------------------------------------------------

    async def _exists(self, key: str, action: str) -> bool:
        bucket, s3key = self._split(key)
        try:
            await self._request(action, key, "head_object", Bucket=bucket, Key=s3key)
        except FileNotFoundError:
            return False
        return True

    def info(self, key: str) -> Entry:
        bucket, s3key = self._split(key)
        head = self._run(self._request("looking up", key, "head_object", Bucket=bucket, Key=s3key), "looking up", key)
        modified = head.get("LastModified")
        return Entry(key, int(head.get("ContentLength") or 0), float(modified.timestamp()) if modified else 0.0)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys with no object, in order; the HEADs run concurrently."""
        exists = self._each(keys, lambda k: self._exists(k, "looking up"), "looking up")
        return [k for k, e in zip(keys, exists, strict=True) if not e]

    def delete(self, keys: Sequence[str]) -> None:
        """Remove these objects (DELETEs run concurrently; S3 deletes a missing key without complaint)."""

        async def one(k: str) -> None:
            bucket, s3key = self._split(k)
            with contextlib.suppress(FileNotFoundError):
                await self._request("deleting", k, "delete_object", Bucket=bucket, Key=s3key)

        self._each(keys, one, "deleting")

    def _each(self, keys: Sequence[str], call: Callable[[str], Awaitable[_T]], action: str) -> list[_T]:
        """``call(key)`` for every key on s3fs's loop, a bounded number at once; results in order."""

        async def run() -> list[_T]:
            slots = asyncio.Semaphore(max(self.max_concurrency, _MIN_LOOKUPS))

            async def one(k: str) -> _T:
                async with slots:
                    return await call(k)

            return list(await asyncio.gather(*(one(k) for k in keys)))

        if not keys:
            return []
        return self._run(run(), action, keys[0] if len(keys) == 1 else None)

    # --- clean-up ----------------------------------------------------------------------------------------------

    def remove_stale_temporaries(self, prefixes: Sequence[str], older_than: float, dry_run: bool) -> int:
        """Abort incomplete multipart uploads under ``prefixes`` started more than ``older_than`` seconds ago
        (left by killed saves; a recent one may belong to a save in progress). Returns how many."""
        return int(self._run(self._remove_stale(prefixes, older_than, dry_run), "cleaning up", None))

    async def _remove_stale(self, prefixes: Sequence[str], older_than: float, dry_run: bool) -> int:
        bucket, root, _ = self.fs.split_path(self.root)
        root = root.rstrip("/") + "/" if root.strip("/") else ""
        under = tuple(root + p.strip("/") + "/" for p in prefixes)
        now = time.time()
        stale: list[tuple[str, str]] = []
        markers: dict[str, Any] = {}
        while True:  # one listing of the whole repository, however many prefixes
            page = await self._request("cleaning up", None, "list_multipart_uploads", Bucket=bucket, Prefix=root,
                                       **markers)  # fmt: skip
            for u in page.get("Uploads", []):
                initiated = u.get("Initiated")
                if u["Key"].startswith(under) and initiated is not None and now - initiated.timestamp() > older_than:
                    stale.append((u["Key"], u["UploadId"]))
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}
        if not dry_run:
            for k, upload in stale:
                with contextlib.suppress(FileNotFoundError):
                    await self._request("cleaning up", k[len(root) :], "abort_multipart_upload", Bucket=bucket, Key=k,
                                        UploadId=upload)  # fmt: skip
        return len(stale)

    async def _list(self, prefix: str) -> list[Entry]:
        bucket, root, _ = self.fs.split_path(self.root)
        root = root.rstrip("/") + "/" if root.strip("/") else ""
        under = root + prefix.strip("/") + "/"
        out: list[Entry] = []
        token: dict[str, Any] = {}
        while True:
            try:
                page = await self._request("listing", prefix.strip("/") + "/", "list_objects_v2", Bucket=bucket,
                                           Prefix=under, **token)  # fmt: skip
            except FileNotFoundError:  # no such bucket: nothing under the prefix
                return out
            for obj in page.get("Contents", []):
                k = str(obj["Key"])
                if k.endswith("/"):
                    continue  # a folder marker that some tools create, not an object
                modified = obj.get("LastModified")
                out.append(Entry(k[len(root) :], int(obj.get("Size") or 0),
                                 float(modified.timestamp()) if modified else 0.0))  # fmt: skip
            if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                return out
            token = {"ContinuationToken": str(page["NextContinuationToken"])}

    # Named like the builtin, so last: the annotations above mean the builtin ``list``.
    def list(self, prefix: str) -> list[Entry]:
        """One LIST request per 1,000 objects under ``prefix/`` (each under its own deadline)."""
        return self._run(self._list(prefix), "listing", prefix.strip("/") + "/")


class _Where:
    """What a read is of, for its requests and its errors."""

    def __init__(self, backend: S3Backend, action: str, key: str, bucket: str, s3key: str) -> None:
        self.backend, self.action, self.key, self.bucket, self.s3key = backend, action, key, bucket, s3key
        self.etag: str | None = None


class _Fill:
    """A buffer being filled by ranged GETs, part by part, and its frontier: how far from its start every byte has
    arrived (written on s3fs's loop; a hashing thread reads it and is woken every :data:`_HASH_STEP` bytes)."""

    def __init__(self) -> None:
        self.view: memoryview | None = None
        self.parts: list[tuple[int, int]] = []
        self.got: list[int] = []
        self.frontier = 0
        self._first = 0  # the first part not yet complete
        self._signalled = 0
        self.wake = threading.Event()

    def start(self, view: memoryview, parts: list[tuple[int, int]]) -> None:
        self.view, self.parts, self.got = view, parts, [0] * len(parts)
        self.wake.set()

    def add(self, i: int, n: int) -> None:
        """``n`` more bytes of part ``i`` arrived."""
        self.got[i] += n
        if i != self._first:
            return
        parts, got = self.parts, self.got
        k = self._first
        while k < len(parts) and got[k] == parts[k][1] - parts[k][0]:
            k += 1
        self._first = k
        self.frontier = parts[k][0] + got[k] if k < len(parts) else parts[-1][1]
        if self.frontier - self._signalled >= _HASH_STEP:
            self._signalled = self.frontier
            self.wake.set()


async def _drain(body: Any, fill: _Fill, i: int, where: _Where) -> None:
    """Read ``body`` into part ``i`` of ``fill`` until it ends or the part is full. aiohttp's buffered chunks are
    taken as they are (``readany``: no joining copy); other bodies are read a MiB at a time."""
    assert fill.view is not None
    view = fill.view
    lo, hi = fill.parts[i]
    content = getattr(getattr(body, "raw_stream", None), "content", None)
    readany = getattr(content, "readany", None)
    while (pos := lo + fill.got[i]) < hi:
        chunk = await (readany() if readany is not None else body.read(min(_READ_CHUNK, hi - pos)))
        if not chunk:
            return
        if len(chunk) > hi - pos:
            raise StorageError(where.backend.url, where.action, where.key,
                               f"a ranged GET of bytes {pos}-{hi - 1} answered more bytes than asked")  # fmt: skip
        view[pos : pos + len(chunk)] = chunk
        fill.add(i, len(chunk))


def _fresh(n: int) -> mmap.mmap:
    """``n`` bytes of private anonymous memory, not yet touched (no zeroing pass: the kernel supplies each page
    on first write; transparent huge pages asked for a large buffer), as the local backend reads into."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: anonymous mappings there take no flags
        return mmap.mmap(-1, n)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if advice is not None and n >= _HUGE_PAGES_FROM:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain pages then
            m.madvise(advice)
    return m


class _ProducerFailed(Exception):
    """The generator a lazy :meth:`S3Backend.put` consumes raised ``error`` (not a failure of the store)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _pull(objects: Iterator[_T]) -> _T | None:
    """The next of ``objects`` (None at the end); its error as :class:`_ProducerFailed`."""
    try:
        return next(objects, None)
    except Exception as err:
        raise _ProducerFailed(err) from err


def _failed(tasks: list[asyncio.Future[int]]) -> asyncio.Future[int] | None:
    """The first of ``tasks`` that has failed, if any."""
    return next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Body:
    """An upload's body without a copy: bytes of the caller's buffers (views of them), streamed by aiohttp as an
    async iterable a MiB at a time (a ``bytes`` body is copied three or four times on s3fs's loop: botocore's
    BytesIO, aiohttp's slice, asyncio's join and its send buffer), and read as a file where botocore must (its
    retries rewind it with ``seek(0)``). ``sha256`` is the SHA-256 (hex) of the bytes when SigV4 signs the payload,
    computed off the loop by :func:`_make_body`."""

    def __init__(self, pieces: list[memoryview]) -> None:
        self._pieces = pieces
        self._size = sum(len(p) for p in pieces)
        self._pos = 0
        self.sha256: str | None = None

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence not in (0, 1, 2):
            raise InvalidArgumentError(f"seek whence={whence!r}: 0, 1 or 2")
        base = (0, self._pos, self._size)[whence]
        self._pos = min(max(base + offset, 0), self._size)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out = b"".join(self._views(self._pos, end))
        self._pos = end
        return out

    def _views(self, start: int, end: int, step: int | None = None) -> Iterator[memoryview]:
        """Views of bytes ``start:end``, each at most ``step`` long."""
        offset = 0
        for v in self._pieces:
            lo, hi = max(start - offset, 0), min(end - offset, len(v))
            offset += len(v)
            for at in range(lo, hi, step or max(hi - lo, 1)):
                yield v[at : min(hi, at + (step or hi))]
            if offset >= end:
                return

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[memoryview]:
        for v in self._views(self._pos, self._size, _SEND_CHUNK):
            self._pos += len(v)
            yield v


def _make_body(views: list[memoryview], start: int, end: int, sha: bool, crc: bool) -> tuple[_Body, dict[str, str]]:
    """Bytes ``start:end`` of the concatenation of ``views`` as a :class:`_Body`, and the checksum parameters of
    its request (``ChecksumCRC32`` when ``crc``: botocore then computes none). hashlib and zlib release the GIL."""
    pieces: list[memoryview] = []
    offset = 0
    for v in views:
        lo, hi = max(start - offset, 0), min(end - offset, len(v))
        if lo < hi:
            pieces.append(v[lo:hi])
        offset += len(v)
        if offset >= end:
            break
    body = _Body(pieces)
    if sha:
        h = hashlib.sha256()
        for p in pieces:
            h.update(p)
        body.sha256 = h.hexdigest()
    extra: dict[str, str] = {}
    if crc:
        value = 0
        for p in pieces:
            value = zlib.crc32(p, value)
        extra["ChecksumCRC32"] = base64.b64encode((value & 0xFFFFFFFF).to_bytes(4, "big")).decode("ascii")
    return body, extra


_DIGESTS_TAKEN: weakref.WeakSet[Any] = weakref.WeakSet()  # clients whose S3 requests sign with _SIGNER


def _take_digests(client: Any) -> None:
    """Have ``client`` sign its S3 requests with a signer that takes a :class:`_Body`'s precomputed SHA-256
    instead of hashing the body on the loop; every other body, and every other setting, is signed as before."""
    if client in _DIGESTS_TAKEN:
        return
    import botocore.auth  # type: ignore[import-untyped]

    if _SIGNER not in botocore.auth.AUTH_TYPE_MAPS:
        botocore.auth.AUTH_TYPE_MAPS[_SIGNER] = _digest_signer(botocore.auth.S3SigV4Auth)

    import botocore.handlers  # type: ignore[import-untyped]

    def choose(context: Any, signing_name: Any, signature_version: Any = None, **kwargs: Any) -> str | None:
        # Presigned URLs and forms ask for "...-query" / "...-presign-post", an anonymous client for UNSIGNED:
        # those are left to botocore. This handler runs first, so botocore's own choice for the operation is
        # asked here (it would answer first otherwise): where it is s3v4, the same signer that also takes a
        # digest; anything else (sigv4a, S3 Express) is botocore's, which it then answers again.
        if not isinstance(signature_version, str) or signature_version.endswith(("-query", "-presign-post")):
            return None
        chosen = botocore.handlers.set_operation_specific_signer(context=context, signing_name=signing_name,
                                                                 **kwargs)  # fmt: skip
        return _SIGNER if (chosen or signature_version) == "s3v4" else None

    client.meta.events.register_first("choose-signer.s3", choose, unique_id="ckptkit-s3-body-digests")
    _DIGESTS_TAKEN.add(client)


def _digest_signer(base: Any) -> Any:
    class DigestSigner(base):  # type: ignore[misc]
        def payload(self, request: Any) -> Any:
            body = request.body
            streaming = getattr(self, "_is_streaming_checksum_payload", lambda _: False)(request)
            if isinstance(body, _Body) and body.sha256 is not None and not streaming and (
                    self._should_sha256_sign_payload(request)):  # fmt: skip
                return body.sha256
            return super().payload(request)

    DigestSigner.__name__ = DigestSigner.__qualname__ = "CkptkitS3SigV4Auth"
    return DigestSigner


def _s3_error(err: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind an s3fs error (botocore's ClientError somewhere in its causes)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return (str(code) if code is not None else None), (int(status) if status is not None else None)
        seen = seen.__cause__
    return None, None
