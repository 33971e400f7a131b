"""The storage backend protocol: whole objects under keys, with the few atomic operations a repository needs.

A :class:`Backend` stores immutable byte objects under ``/``-separated keys relative to its ``root``
(``objects/ab/ab12...``, ``checkpoints/step-10.json``). It knows nothing of hashes, manifests or gc; the
repository (:mod:`ckptkit.storage.repository`) builds those semantics once, on top of these methods.

What every backend guarantees:

* :meth:`Backend.put` stores whole objects: an object under its final key is never partial, even if the
  process is killed mid-write (temporary file + fsync + rename on local disk; one PUT, or a multipart upload
  that becomes visible only when it completes, on object stores). It replaces what the key held.
* :meth:`Backend.put_if_absent` stores an object only if the key is free, and says whether it did. This is the
  commit of a checkpoint and the taking of the gc lock. It is atomic where the store allows it: an
  ``O_EXCL``-style hard link on local disk; a conditional PUT (``If-None-Match: *``) on S3 (on a server
  without conditional writes, an existence check before a plain PUT); an existence check before the write on
  any other fsspec filesystem, which leaves a short window in which two writers can both succeed.
* Listings and existence checks are never served from a cache: other processes change the store.
* Reads treat what is stored as untrusted: :meth:`Backend.get` reads whole objects only (on local disk regular
  files only, never a FIFO, a device or a directory) and, given ``max_size``, refuses a larger object before
  reading any of it (:class:`~ckptkit.errors.CorruptObjectError`).
* Failures of the store itself (a refused or cut connection, a truncated response, an unreadable file) raise
  :class:`~ckptkit.errors.StorageError` (an ``OSError``) naming the repository, the action and the key, with the
  library's own error chained; a missing key is a ``FileNotFoundError``. On S3 every request has a deadline
  (``timeout``), past which it raises :class:`~ckptkit.errors.StorageTimeoutError` (a ``TimeoutError`` too).

Three backends implement it: :class:`~ckptkit.storage.local.LocalBackend`,
:class:`~ckptkit.storage.s3.S3Backend` and :class:`~ckptkit.storage.fsspec_backend.FsspecBackend` (any other
fsspec filesystem). :func:`open_backend` picks one for a URL.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ckptkit.errors import InvalidArgumentError, MissingDependencyError

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "DEFAULT_READ_CONCURRENCY",
    "DEFAULT_READ_PART_SIZE",
    "DEFAULT_TIMEOUT",
    "MAX_MANIFEST_SIZE",
    "MIB",
    "Backend",
    "Entry",
    "in_background",
    "is_s3_filesystem",
    "open_backend",
    "writing_in_background",
]

MIB = 1 << 20
_BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptkit_background_writes", default=False)


@contextlib.contextmanager
def in_background() -> Iterator[None]:
    """Mark the writes made inside (on this thread or task) as an async save's: nobody waits on their wall time,
    so a backend may spend less CPU at the cost of latency (local disk: ``O_DIRECT``, see ``direct_io``).

    Example:
        >>> with in_background():
        ...     writing_in_background()
        True
        >>> writing_in_background()
        False
    """
    token = _BACKGROUND.set(True)
    try:
        yield
    finally:
        _BACKGROUND.reset(token)


def writing_in_background() -> bool:
    """Whether the caller is inside :func:`in_background`."""
    return _BACKGROUND.get()

DEFAULT_PART_SIZE = 8 * MIB
"""S3: objects larger than this are uploaded in parts of this size (S3 allows 5 MiB to 5 GiB per part)."""
DEFAULT_MAX_CONCURRENCY = 8
"""S3: requests in flight at once (memory held: about ``part_size * max_concurrency``)."""
DEFAULT_READ_PART_SIZE = 64 * MIB
"""S3: objects are read with ranged GETs of this many bytes (an object up to this size: one GET)."""
DEFAULT_READ_CONCURRENCY = 8
"""S3: ranged GETs in flight at once across the reads of one repository (a restore's objects share them)."""
DEFAULT_TIMEOUT = 60.0
"""S3: seconds one request may take, retries included, plus a second per MiB it carries (docs/cloud-storage.md)."""
MAX_MANIFEST_SIZE = 64 * MIB
"""Bytes: the most a manifest (or another small file of the repository's own) may hold; a larger one is refused
unread (real manifests are kilobytes to a few megabytes)."""


@dataclass(frozen=True)
class Entry:
    """A stored object, as listed: its key (relative to the backend's root), size in bytes and modification
    time (seconds since the epoch, as the store reports it; 0.0 where it reports none)."""

    key: str
    size: int
    mtime: float


@runtime_checkable
class Backend(Protocol):
    """Where a repository's bytes live. Keys are ``/``-separated and relative to :attr:`root`.

    Attributes:
        fs: the fsspec filesystem underneath (for tools and tests that need the raw store).
        root: the path, in ``fs``'s namespace, that keys are relative to.
    """

    fs: Any
    root: str
    kind: str
    """``"local"``, ``"s3"`` or ``"fsspec"``: what the repository reports as ``local`` / ``s3``."""

    def put(self, objects: Iterable[tuple[str, Iterable[memoryview]]]) -> int:
        """Store several whole objects, each from its chunks; returns the bytes written.

        Several at once so that the backend can overlap them (the fsync of one with the writing of the next
        on local disk; concurrent uploads on S3). An object appears under its key only once complete; on an
        error, no partial object is left under any key.
        """
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if nothing has that key; False when something has (see the module
        docstring for how atomic this is on each store)."""
        ...

    def get(self, key: str, max_size: int | None = None) -> tuple[memoryview, str]:
        """The whole object as a writable buffer, and the blake3 hex digest of its bytes (computed while
        reading where the backend can). Raises ``FileNotFoundError`` when there is no such key, and
        :class:`~ckptkit.errors.CorruptObjectError` without reading it when what the key holds is not an object
        (a directory, a FIFO, a device) or is larger than ``max_size`` bytes."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes ``offset`` to ``offset + length`` of an object (fewer at its end)."""
        ...

    def info(self, key: str) -> Entry:
        """Size and modification time of one object. Raises ``FileNotFoundError`` when there is no such key."""
        ...

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys among ``keys`` with no stored object, in order (checked concurrently where that helps)."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Remove these objects; keys with no object are ignored."""
        ...

    def remove_stale_temporaries(self, prefixes: Sequence[str], older_than: float, dry_run: bool) -> int:
        """Remove what writes that never finished left under ``prefixes`` and that is older than ``older_than``
        seconds (temporary files on local disk, incomplete multipart uploads on S3); returns how many there
        were. With ``dry_run``, only count them."""
        ...

    # Named like the builtin, so last: the annotations above mean the builtin ``list``.
    def list(self, prefix: str) -> list[Entry]:
        """Every object whose key lies under ``prefix/``, at any depth; empty when there is none."""
        ...


def open_backend(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    part_size: int | None = None,
    max_concurrency: int | None = None,
    timeout: float | None = None,
    read_part_size: int | None = None,
    read_concurrency: int | None = None,
    direct_io: bool | None = None,
) -> Backend:
    """The backend for ``url``: local disk, S3, or any other fsspec filesystem.

    ``part_size``, ``max_concurrency``, ``timeout``, ``read_part_size`` and ``read_concurrency`` are options of
    the S3 backend (:class:`~ckptkit.storage.s3.S3Backend`); ``direct_io`` is one of the local-disk backend
    (:class:`~ckptkit.storage.local.LocalBackend`: large objects written with ``O_DIRECT`` always, never, or, by
    default, ``None``, in async saves only); ``None`` takes their defaults.

    Raises:
        InvalidArgumentError: ``storage_options`` asks for a listings cache, or S3 options are given for a URL
            that is not on S3 or ``direct_io`` for one not on local disk (they would have no effect there), or
            they are out of range.
        MissingDependencyError: the fsspec implementation for the URL's protocol is not installed.

    Example:
        >>> type(open_backend("memory://docs-backend")).__name__
        'FsspecBackend'
    """
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from ckptkit.storage.fsspec_backend import FsspecBackend
    from ckptkit.storage.local import LocalBackend

    options = dict(storage_options or {})
    if options.get("use_listings_cache"):
        raise InvalidArgumentError("storage_options: use_listings_cache=True is not supported: a repository must "
                                   "see what other processes wrote, so it never lists from a cache")  # fmt: skip
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
        cache = getattr(fs, "dircache", None)
        if not isinstance(fs, LocalFileSystem) and getattr(cache, "use_listings_cache", False):
            fs, root = fsspec.core.url_to_fs(url, **options, use_listings_cache=False)
    except ValueError as err:  # fsspec: an unknown protocol, or options its filesystem does not take
        raise InvalidArgumentError(f"cannot open {url}: {err}; check the URL's protocol (s3://, gs://, memory://, "
                                   "a local path) and the storage options") from err
    except ImportError as err:
        proto = url.split("://", 1)[0]
        raise MissingDependencyError(
            f"cannot open {url}: the fsspec backend for {proto}:// is not installed ({err}); "
            f"for S3 install `ckptkit[s3]`"
        ) from err
    root = root.rstrip("/") or "/"
    local = isinstance(fs, LocalFileSystem)
    if direct_io is not None and not local:
        raise InvalidArgumentError(f"direct_io applies to repositories on local disk; {url} is on "
                                   f"{type(fs).__name__}, which would ignore it")  # fmt: skip
    if direct_io is not None and not isinstance(direct_io, bool):
        raise InvalidArgumentError(f"direct_io must be True, False or None (async saves only), got {direct_io!r}")
    if is_s3_filesystem(fs):
        from ckptkit.storage.s3 import S3Backend  # asyncio and s3fs's loop: only for S3 repositories

        return S3Backend(
            fs,
            root,
            part_size=DEFAULT_PART_SIZE if part_size is None else part_size,
            max_concurrency=DEFAULT_MAX_CONCURRENCY if max_concurrency is None else max_concurrency,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            read_part_size=DEFAULT_READ_PART_SIZE if read_part_size is None else read_part_size,
            read_concurrency=DEFAULT_READ_CONCURRENCY if read_concurrency is None else read_concurrency,
        )
    s3_only = (part_size, max_concurrency, timeout, read_part_size, read_concurrency)
    if any(v is not None for v in s3_only):
        raise InvalidArgumentError(
            f"part_size, max_concurrency, timeout, read_part_size and read_concurrency apply to S3 repositories "
            f"(s3://...); {url} is on {type(fs).__name__}, which would ignore them"
        )
    if local:
        return LocalBackend(fs, os.path.abspath(root), direct_io=direct_io)
    return FsspecBackend(fs, root)


def is_s3_filesystem(fs: Any) -> bool:
    """Whether ``fs`` is an s3fs filesystem (one with the async S3 calls the S3 backend uses)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols and hasattr(fs, "_call_s3") and hasattr(fs, "split_path")
