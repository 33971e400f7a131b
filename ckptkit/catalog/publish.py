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

import importlib.util
import os
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from ckptkit.catalog.background import CommitQueue
from ckptkit.catalog.database import open_engine, resolve_url, shown_url
from ckptkit.catalog.indexer import index_committed
from ckptkit.engine.manifests import RepoLike, open_repository
from ckptkit.errors import CkptkitError, InvalidArgumentError, MissingDependencyError, StorageError
from ckptkit.schema import Manifest

__all__ = ["CommitIndexer"]


class CommitIndexer(CommitQueue):
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

    NOUN = "indexer"
    DONE = "indexed"
    DOING = "indexing"
    SERVICE = "catalog"

    def __init__(self, catalog: str | os.PathLike[str], repo: RepoLike, storage_options: dict[str, Any] | None = None,
                 *, hash_tensors: bool = False, max_queue: int = 1000, timeout: float = 2.0) -> None:  # fmt: skip
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgumentError(f"timeout={timeout!r}: must be a positive number of seconds")
        url = resolve_url(catalog)
        if url.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:  # found now, not at save
            raise MissingDependencyError(f"catalog {shown_url(url)} is PostgreSQL, whose driver psycopg is not "
                                         "installed: pip install 'ckptkit[postgres]'")  # fmt: skip
        super().__init__(open_repository(repo, storage_options), max_queue=max_queue, thread_name="ckptkit-catalog")
        self.url = url
        self.hash_tensors = bool(hash_tensors)
        self.timeout = float(timeout)
        self._engine: Engine | None = None

    def __repr__(self) -> str:
        return f"CommitIndexer({shown_url(self.url)!r}, {self.repo.url!r})"

    @property
    def indexed(self) -> int:
        """Manifests indexed so far."""
        return self.delivered

    def _target(self) -> str:
        return f"catalog {shown_url(self.url)}"

    def _remedy(self) -> str:
        return f"`ckptkit catalog add {self.repo.url}` indexes"

    def _deliver(self, manifest: Manifest, retired: tuple[str, ...]) -> str | None:
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
            self._failed(manifest, err)
        else:
            self._done()
        return None

    def _dispose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()
