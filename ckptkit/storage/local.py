"""The local-disk backend: crash-safe writes with temporary files, fsync and rename, and one-pass hashed reads.

Write: each object goes to a temporary file ``.tmp-<uuid>`` beside its final name, is fsync'd, and only then
renamed into place (``put``, replacing what was there) or hard-linked into place (``put_if_absent``: the link
fails if the name exists, so a committed checkpoint or a held gc lock is never replaced), and the directory
is fsync'd so that the new name survives a power loss. A crash at any moment leaves complete objects and
temporary files (removed by gc once stale), never a partial object. When several objects are written at once,
their fsyncs run on a background thread while the next is written, and all are on disk before any gets its name.

Read: into a private anonymous memory mapping, hashing each chunk right after it is read (one pass over memory;
the kernel supplies the mapping's pages as they are first written, where a ``bytearray`` would be zero-filled
first), with transparent huge pages for large objects.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Sequence

from ckptkit.hashing import hasher
from ckptkit.storage.fsspec_backend import FsspecBackend

__all__ = ["HUGE_PAGES_FROM", "READ_CHUNK", "TEMP_PREFIX", "LocalBackend"]

READ_CHUNK = 8 << 20
"""Bytes read (and then hashed) at a time."""
HUGE_PAGES_FROM = 4 << 20
"""Bytes: reads at least this large ask the kernel for transparent huge pages (fewer page faults)."""
TEMP_PREFIX = ".tmp-"
"""File names of writes in progress (or of writes that crashed) start with this."""


class LocalBackend(FsspecBackend):
    """A :class:`~ckptkit.storage.backend.Backend` on local disk (``fs`` is fsspec's ``LocalFileSystem``, ``root``
    an absolute path). Listing, lookup and deletion are :class:`FsspecBackend`'s."""

    kind = "local"

    def put(self, objects: Iterable[tuple[str, Iterable[memoryview]]]) -> int:
        written = 0
        staged: list[tuple[str, str]] = []
        syncer = _Fsyncer()  # a plain thread: concurrent.futures refuses new work at interpreter exit
        try:
            for key, chunks in objects:
                path = self.path(key)
                tmp, fd = _create_temp(os.path.dirname(path))
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

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self.path(key)
        directory = os.path.dirname(path)
        tmp, fd = _create_temp(directory)
        try:
            try:
                _write_all(fd, [memoryview(data)])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)  # fails if `path` exists: atomic, and it never replaces what is there
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(directory)
        return True

    def get(self, key: str) -> tuple[memoryview, str]:
        with open(self.path(key), "rb", buffering=0) as f:
            n = os.fstat(f.fileno()).st_size
            view = memoryview(_anonymous(n) if n else bytearray()).cast("B")
            h = hasher(n)
            got = 0
            while got < n:
                k = f.readinto(view[got : got + READ_CHUNK])
                if not k:
                    break  # the file shrank while we read: the caller's size check reports it
                h.update(view[got : got + k])
                got += k
        return view[:got], str(h.hexdigest())

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self.path(key), "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)

    def remove_stale_temporaries(self, prefixes: Sequence[str], older_than: float, dry_run: bool) -> int:
        """Remove the temporary files of writes that crashed (see the module docstring), wherever under
        ``prefixes`` a write makes them."""
        found = 0
        now = time.time()
        for prefix in prefixes:
            for dirpath, _, files in os.walk(self.path(prefix)):
                for f in files:
                    if not f.startswith(TEMP_PREFIX):
                        continue
                    p = os.path.join(dirpath, f)
                    try:
                        if now - os.path.getmtime(p) <= older_than:
                            continue
                        found += 1
                        if not dry_run:
                            os.unlink(p)
                    except FileNotFoundError:
                        continue  # removed meanwhile (by another gc, or the write finished)
        return found


def _anonymous(n: int) -> mmap.mmap:
    """``n`` bytes of private anonymous memory, not yet touched (the kernel supplies each page on first write).

    Private, not ``mmap``'s default shared mapping: shared anonymous memory is shmem, whose page faults cost
    about twice as much, and which gets no transparent huge pages; with them (``MADV_HUGEPAGE``, as numpy asks for
    large arrays) a large read into the mapping runs 2-3 times faster than into a shared one, measured here.
    """
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: anonymous mappings there take no flags
        return mmap.mmap(-1, n)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if advice is not None and n >= HUGE_PAGES_FROM:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain pages then
            m.madvise(advice)
    return m


def _create_temp(directory: str) -> tuple[str, int]:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


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
        err = self._error
        if raise_errors and err is not None:
            raise err  # the fsync's own error, raised on the caller's thread


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
