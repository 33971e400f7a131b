"""The S3 backend: concurrent uploads under one request budget, multipart above ``part_size``, conditional commits.

Upload: :meth:`S3Backend.put` uploads every object of a call on s3fs's event loop with at most
``max_concurrency`` requests in flight across all of them: one PUT for an object up to ``part_size``, a
multipart upload above (which becomes visible only when it completes). On any error, or when the caller is
interrupted, every upload the call started and did not complete is aborted, so an object under its final key is
never partial (and what an abort misses, e.g. after SIGKILL, gc aborts once stale: S3 keeps, and bills, the
parts of an incomplete upload until then).

Commit: :meth:`S3Backend.put_if_absent` is a conditional PUT (``If-None-Match: *``): of two writers racing for
one key, the server lets only the first one in (412 for the other). A server without conditional writes
(501 / NotImplemented) gets a plain PUT; the existence check before it is then what protects.

Existence: :meth:`S3Backend.missing` and :meth:`S3Backend.delete` run their HEADs and DELETEs concurrently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from fsspec.asyn import sync

from ckptkit.errors import InvalidArgumentError
from ckptkit.storage.backend import DEFAULT_MAX_CONCURRENCY, DEFAULT_PART_SIZE, MIB, Entry, is_s3_filesystem
from ckptkit.storage.fsspec_backend import FsspecBackend

__all__ = ["DEFAULT_MAX_CONCURRENCY", "DEFAULT_PART_SIZE", "S3Backend"]

_MIN_PART = 5 * MIB
_MAX_PART = 5 << 30
_MAX_PARTS = 10_000
_MIN_LOOKUPS = 8  # HEADs and DELETEs in flight at once, at least (they hold no memory)

_T = TypeVar("_T")


class S3Backend(FsspecBackend):
    """A :class:`~ckptkit.storage.backend.Backend` on S3 through s3fs (``fs`` an ``S3FileSystem``).

    Args:
        fs: the s3fs filesystem.
        root: ``bucket/prefix`` that keys are relative to.
        part_size: objects larger than this many bytes are uploaded in parts of this size (5 MiB to 5 GiB;
            raised for an object that would otherwise need more than 10,000 parts).
        max_concurrency: requests (parts, or whole small objects) in flight at once across one :meth:`put`.

    Raises:
        InvalidArgumentError: ``part_size`` or ``max_concurrency`` out of range.
    """

    kind = "s3"

    def __init__(
        self, fs: Any, root: str, *, part_size: int = DEFAULT_PART_SIZE, max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    ) -> None:
        super().__init__(fs, root)
        if not _is_int(part_size) or not _MIN_PART <= part_size <= _MAX_PART:
            raise InvalidArgumentError(f"part_size={part_size!r}: S3 parts are 5 MiB ({_MIN_PART}) to 5 GiB "
                                       f"({_MAX_PART})")  # fmt: skip
        if not _is_int(max_concurrency) or max_concurrency < 1:
            raise InvalidArgumentError(f"max_concurrency={max_concurrency!r}: must be a positive integer")
        self.part_size = part_size
        self.max_concurrency = max_concurrency

    @staticmethod
    def supports(fs: Any) -> bool:
        """Whether ``fs`` is an s3fs filesystem (one with the async S3 calls this backend uses)."""
        return is_s3_filesystem(fs)

    # --- writes ------------------------------------------------------------------------------------------------

    def put(self, objects: Iterable[tuple[str, Iterable[memoryview]]]) -> int:
        """Upload objects concurrently (see the module docstring); an object appears only once complete."""
        views = [(self.path(k), [memoryview(c).cast("B") for c in chunks]) for k, chunks in objects]
        future = asyncio.run_coroutine_threadsafe(self._upload_all(views), self.fs.loop)
        try:
            return int(future.result())
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt here: the uploads are cancelled and aborted on the loop
            with contextlib.suppress(BaseException):
                concurrent.futures.wait([future], timeout=60)
            raise

    async def _upload_all(self, objects: list[tuple[str, list[memoryview]]]) -> int:
        slots = asyncio.Semaphore(self.max_concurrency)  # wakes waiters in order: objects finish roughly in order
        open_uploads: dict[str, tuple[str, str]] = {}  # upload id -> (bucket, key), until completed
        tasks = [asyncio.ensure_future(self._upload_one(path, views, slots, open_uploads))
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

    async def _upload_one(self, path: str, views: list[memoryview], slots: asyncio.Semaphore,
                          open_uploads: dict[str, tuple[str, str]]) -> int:  # fmt: skip
        bucket, key, _ = self.fs.split_path(path)
        size = sum(len(v) for v in views)
        if size <= self.part_size:
            async with slots:
                await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=b"".join(views))
            return size
        part = max(self.part_size, math.ceil(size / _MAX_PARTS))
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

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``) after an existence check; see the module docstring."""
        path = self.path(key)
        if self.fs.exists(path):
            return False
        bucket, s3key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=s3key, Body=data, IfNoneMatch="*")
        except FileExistsError:
            return False
        except OSError as err:
            code, status = _s3_error(err)
            if code == "PreconditionFailed" or status == 412:
                return False
            if code in ("NotImplemented", "InvalidArgument") or status == 501:
                # A server without conditional writes: the existence check before this is what protects.
                self.fs.call_s3("put_object", Bucket=bucket, Key=s3key, Body=data)
                return True
            raise
        return True

    # --- lookups -----------------------------------------------------------------------------------------------

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys with no object, in order; the HEADs run concurrently."""
        if len(keys) < 2:
            return super().missing(keys)
        exists = self._each(keys, self.fs._exists)
        return [k for k, e in zip(keys, exists, strict=True) if not e]

    def delete(self, keys: Sequence[str]) -> None:
        """Remove these objects (DELETEs run concurrently; S3 deletes a missing key without complaint)."""
        if len(keys) < 2:
            super().delete(keys)
            return
        self._each(keys, self.fs._rm_file)

    def _each(self, keys: Sequence[str], call: Callable[[str], Awaitable[_T]]) -> list[_T]:
        """``call(path)`` for every key on s3fs's loop, a bounded number at once; results in order."""

        async def run() -> list[_T]:
            slots = asyncio.Semaphore(max(self.max_concurrency, _MIN_LOOKUPS))

            async def one(k: str) -> _T:
                async with slots:
                    return await call(self.path(k))

            return list(await asyncio.gather(*(one(k) for k in keys)))

        out: list[_T] = sync(self.fs.loop, run)
        return out

    # --- clean-up ----------------------------------------------------------------------------------------------

    def remove_stale_temporaries(self, prefixes: Sequence[str], older_than: float, dry_run: bool) -> int:
        """Abort incomplete multipart uploads under ``prefixes`` started more than ``older_than`` seconds ago
        (left by killed saves; a recent one may belong to a save in progress). Returns how many."""
        bucket, root, _ = self.fs.split_path(self.root)
        root = root.rstrip("/") + "/" if root.strip("/") else ""
        under = tuple(root + p.strip("/") + "/" for p in prefixes)
        now = time.time()
        stale: list[tuple[str, str]] = []
        markers: dict[str, str] = {}
        while True:  # one listing of the whole repository, however many prefixes
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root, **markers)
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
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=k, UploadId=upload)
        return len(stale)

    # Named like the builtin, so last: the annotations above mean the builtin ``list``.
    def list(self, prefix: str) -> list[Entry]:
        # s3fs's find with ``prefix`` is one LIST, without the HEAD that it adds when a folder is empty
        try:
            found = self.fs.find(self.root, prefix=prefix.strip("/") + "/", detail=True)
        except FileNotFoundError:
            return []
        return self.entries(prefix, found)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
