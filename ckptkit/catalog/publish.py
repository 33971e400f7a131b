"""Indexing at save time: a :class:`CommitIndexer` takes each manifest a save commits and indexes it in the
background, so that the catalog is up to date without a ``catalog sync``, and a save is never failed or slowed
by the catalog.

``submit`` only appends to a bounded queue; one daemon thread indexes what is queued, in order. When the catalog
cannot be reached (a server down, a file it may not write, a lock held too long), the entry stays queued and the
thread retries with a growing wait (0.25 s, doubling, at most 30 s), logging one warning per outage. What is not
indexed in the end (the queue overflowed, ``close`` gave up, the process was killed) is still in the repository:
the next ``ckptkit catalog sync`` indexes it (``ckptkit catalog add REPO`` if the catalog never saw the
repository).

Example:
    >>> import os, tempfile
    >>> from ckptkit.schema import Environment, build_manifest
    >>> root = tempfile.mkdtemp()
    >>> m = build_manifest(name="step-1", created_at="2026-01-01T00:00:00+00:00",
    ...                    environment=Environment(ckptkit="0", torch="0", python="3", platform="x"))
    >>> from ckptkit.storage import Repository
    >>> from ckptkit.schema import dump_manifest
    >>> Repository(os.path.join(root, "run")).commit("step-1", dump_manifest(m))
    >>> idx = CommitIndexer(os.path.join(root, "catalog.db"), os.path.join(root, "run"))
    >>> idx.submit(m)
    >>> idx.flush(30)
    True
    >>> idx.close()
    >>> idx.indexed
    1
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from ckptkit.catalog.database import open_engine, resolve_url, shown_url
from ckptkit.catalog.indexer import index_committed
from ckptkit.engine.manifests import RepoLike, open_repository
from ckptkit.errors import CkptkitError, InvalidArgumentError, MissingDependencyError, StorageError
from ckptkit.schema import Manifest

__all__ = ["CommitIndexer"]

log = logging.getLogger("ckptkit")

_FIRST_WAIT = 0.25
_MAX_WAIT = 30.0
_LIVE: weakref.WeakSet[CommitIndexer] = weakref.WeakSet()


class CommitIndexer:
    """Indexes the manifests committed to one repository into a catalog, in a background thread.

    Args:
        catalog: the catalog (a path, ``sqlite:///PATH`` or ``postgresql://...``; see :class:`Catalog`). It is not
            opened here: a catalog that is down when the run starts does not stop it.
        repo: the repository the manifests are committed to (URL, path or open ``Repository``).
        storage_options: for fsspec, with a URL ``repo``.
        hash_tensors: also hash the tensors of new model objects (what ``find`` matches): a read of each new
            object. Off by default: the next ``catalog sync`` hashes them.
        max_queue: manifests kept while the catalog is unreachable; beyond it the oldest are dropped (and left
            to ``catalog sync``).
        timeout: seconds one attempt waits for SQLite's write lock or a PostgreSQL connection before it counts as
            an outage.

    Attributes ``indexed``, ``rejected`` (manifests the catalog's checks refused, logged) and ``dropped`` count
    what happened to the submitted manifests.

    Raises:
        InvalidArgumentError: ``catalog`` is not a catalog URL, or an option is out of range.
        MissingDependencyError: a PostgreSQL catalog without psycopg installed.
    """

    def __init__(self, catalog: str | os.PathLike[str], repo: RepoLike, storage_options: dict[str, Any] | None = None,
                 *, hash_tensors: bool = False, max_queue: int = 1000, timeout: float = 2.0) -> None:  # fmt: skip
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise InvalidArgumentError(f"max_queue={max_queue!r}: must be a positive integer (manifests kept while "
                                       "the catalog is unreachable)")  # fmt: skip
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgumentError(f"timeout={timeout!r}: must be a positive number of seconds")
        self.url = resolve_url(catalog)
        if self.url.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:  # found now, not at save
            raise MissingDependencyError(f"catalog {shown_url(self.url)} is PostgreSQL, whose driver psycopg is not "
                                         "installed: pip install 'ckptkit[postgres]'")  # fmt: skip
        self.repo = open_repository(repo, storage_options)
        self.hash_tensors = bool(hash_tensors)
        self.max_queue = max_queue
        self.timeout = float(timeout)
        self.indexed = 0
        self.rejected = 0
        self.dropped = 0
        self._queue: deque[tuple[Manifest, tuple[str, ...]]] = deque()
        self._cond = threading.Condition()
        self._busy = False  # the head of the queue is being indexed
        self._closing = False
        self._down: str | None = None  # why the catalog is unreachable, during an outage
        self._overflowing = False
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"CommitIndexer({shown_url(self.url)!r}, {self.repo.url!r})"

    @property
    def pending(self) -> int:
        """Manifests submitted and not yet indexed (or given up)."""
        with self._cond:
            return len(self._queue)

    def submit(self, manifest: Manifest, retired: Iterable[str] = ()) -> None:
        """Queue a manifest just committed to the repository (and the names its save pruned) and return at once.

        Never raises for the catalog's sake: a full queue drops its oldest entry (logged once per overflow), and a
        manifest submitted after :meth:`close` is left to ``catalog sync`` (logged).
        """
        with self._cond:
            if self._closing:
                self.dropped += 1
                log.warning("catalog %s: %s was committed after the indexer closed and is not indexed; "
                            "`ckptkit catalog add %s` indexes it", shown_url(self.url), manifest.name,
                            self.repo.url)  # fmt: skip
                return
            if len(self._queue) >= self.max_queue:
                head_busy = self._busy
                victim = self._queue[1] if head_busy and len(self._queue) > 1 else self._queue[0]
                self._queue.remove(victim)
                self.dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                    log.warning("catalog %s: more than %d checkpoints of %s wait to be indexed (%s); dropping the "
                                "oldest, `ckptkit catalog add %s` indexes them", shown_url(self.url), self.max_queue,
                                self.repo.url, self._down or "the catalog is slow", self.repo.url)  # fmt: skip
            self._queue.append((manifest, tuple(retired)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckptkit-catalog", daemon=True)
                self._thread.start()
                _LIVE.add(self)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted manifest is indexed (True), or ``timeout`` seconds pass, or the catalog is
        found unreachable (False): never waits on an outage."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue and self._down is None and self._thread is not None and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return not self._queue

    def close(self, timeout: float = 10.0) -> None:
        """Index what is queued, trying an unreachable catalog once more, for at most ``timeout`` seconds; then
        drop the rest (logged with its count: ``catalog sync`` indexes it) and stop the thread. Safe to call
        twice."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
            self.dropped += left
        if left:
            log.warning("catalog %s: %d checkpoint(s) of %s not indexed (%s); `ckptkit catalog add %s` indexes them",
                        shown_url(self.url), left, self.repo.url, self._down or f"not done within {timeout:g} s",
                        self.repo.url)  # fmt: skip
        _LIVE.discard(self)
        if thread is None or not thread.is_alive():
            self._dispose()

    # --- the thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        wait = 0.0
        while True:
            with self._cond:
                if wait:
                    self._cond.wait_for(lambda: self._closing, wait)  # close() cuts a wait short
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                entry = self._queue[0]
                self._busy = True
            problem = self._index(*entry)
            with self._cond:
                self._busy = False
                if problem is None:
                    if self._queue and self._queue[0] is entry:
                        self._queue.popleft()
                    if self._down is not None:
                        log.warning("catalog %s is reachable again; indexing the checkpoints of %s that waited",
                                    shown_url(self.url), self.repo.url)  # fmt: skip
                    self._down = None
                    self._overflowing = len(self._queue) >= self.max_queue
                    wait = 0.0
                else:
                    if self._down is None:
                        log.warning("catalog %s unreachable (%s): saves go on; %d checkpoint(s) of %s wait to be "
                                    "indexed, retrying", shown_url(self.url), problem, len(self._queue),
                                    self.repo.url)  # fmt: skip
                    self._down = problem
                    wait = min(max(wait * 2, _FIRST_WAIT), _MAX_WAIT)
                    if self._closing:
                        self._cond.notify_all()
                        break
                self._cond.notify_all()
        self._dispose()

    def _index(self, manifest: Manifest, retired: tuple[str, ...]) -> str | None:
        """Index one manifest: None when done (or refused, logged), else why the catalog cannot be reached."""
        try:
            if self._engine is None:
                self._engine = open_engine(self.url, timeout=self.timeout)
            index_committed(self._engine, self.repo, manifest, retired=retired, hash_tensors=self.hash_tensors)
        except IntegrityError as err:  # a constraint, not an outage: retrying gives the same answer
            self._refused(manifest, f"the catalog refused its rows: {str(err.orig)[:200]}")
        except (StorageError, SQLAlchemyError, OSError) as err:  # down, locked, read-only, connection lost
            detail = err.orig if isinstance(err, DBAPIError) else err
            return str(detail).strip().splitlines()[0][:300] if str(detail).strip() else type(detail).__name__
        except CkptkitError as err:  # the manifest or its chain does not verify: `catalog sync` reports it too
            self._refused(manifest, str(err))
        except Exception as err:  # a bug must not stop the thread (nor ever reach the save): logged, with its trace
            log.exception("catalog %s: indexing %s of %s failed", shown_url(self.url), manifest.name, self.repo.url)
            self._refused(manifest, f"{type(err).__name__}: {err}")
        else:
            with self._cond:
                self.indexed += 1
        return None

    def _refused(self, manifest: Manifest, why: str) -> None:
        with self._cond:
            self.rejected += 1
        log.warning("catalog %s: %s of %s not indexed: %s", shown_url(self.url), manifest.name, self.repo.url, why)

    def _dispose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()


@atexit.register
def _flush_at_exit() -> None:
    """At interpreter exit, give each indexer a moment to index what it holds (none on an outage)."""
    deadline = time.monotonic() + 5.0
    for idx in list(_LIVE):
        idx.flush(max(0.0, deadline - time.monotonic()))
