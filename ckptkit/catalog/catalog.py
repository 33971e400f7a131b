"""The :class:`Catalog`: an index of manifests from many repositories, for questions across runs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import select

from ckptkit.catalog import queries
from ckptkit.catalog import tables as t
from ckptkit.catalog.database import open_engine, resolve_url
from ckptkit.catalog.indexer import IndexReport, index_repository, normalise_url
from ckptkit.catalog.pool import index_many
from ckptkit.catalog.queries import CheckpointRecord, FindMatch
from ckptkit.catalog.tensors import file_tensor_hashes
from ckptkit.errors import InvalidArgumentError

__all__ = ["Catalog"]


class Catalog:
    """An index of the manifests of many repositories: which checkpoints saw a dataset, what descends from a
    checkpoint, which checkpoint holds these exported weights, the best by a metric.

    The repositories stay the source of truth: every row derives from a verified manifest, so a catalog can be
    deleted and rebuilt with :meth:`add` at any time.

    Args:
        url: ``None`` for ``$CKPTKIT_CATALOG`` or else ``$XDG_DATA_HOME/ckptkit/catalog.db``
            (``~/.local/share/ckptkit/catalog.db``); a path for an SQLite file; ``sqlite:///PATH``; or
            ``postgresql://USER:PASSWORD@HOST/DB`` (psycopg 3) for a team's catalog. The schema is created or
            upgraded on open.

    Raises:
        InvalidArgumentError: not a catalog URL, or a catalog whose schema is newer than this ckptkit.
        MissingDependencyError: the database driver is not installed.
        StorageError: the database cannot be reached.

    Example:
        >>> import tempfile, os
        >>> with Catalog(os.path.join(tempfile.mkdtemp(), "catalog.db")) as cat:
        ...     cat.repositories()
        []
    """

    def __init__(self, url: str | os.PathLike[str] | None = None) -> None:
        self.url = resolve_url(url)
        self.engine = open_engine(url)

    def __repr__(self) -> str:
        return f"Catalog({self.engine.url!r})"

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # --- indexing ------------------------------------------------------------------------------------------

    def add(self, repo: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *,
            hash_tensors: bool = True, full: bool = False) -> IndexReport:  # fmt: skip
        """Index the repository at ``repo`` (local path, ``s3://...``, any fsspec URL): every committed and
        archived manifest that verifies and whose parents resolve; report the others.

        Args:
            storage_options: for fsspec (credentials, endpoint); used now, never stored (:meth:`sync` takes them
                again, or use fsspec's configuration or the environment).
            hash_tensors: read the objects of model components to hash each tensor (what :meth:`find` matches):
                one read of each object not hashed before, in any repository.
            full: read every manifest again, not only names the catalog does not hold.

        Raises:
            CheckpointNotFoundError: nothing at ``repo`` (no checkpoint, no archived manifest) and the catalog
                does not know it: a mistyped URL is not added as an empty repository.
            StorageError: the repository or the catalog cannot be reached.

        Example::

            report = cat.add("s3://bucket/runs/base")
            report.indexed, report.rejected
        """
        return index_repository(self.engine, repo, storage_options, hash_tensors=hash_tensors, full=full)

    def add_all(self, repos: Iterable[str | os.PathLike[str]], storage_options: dict[str, Any] | None = None, *,
                hash_tensors: bool = True, full: bool = False, workers: int | None = None) -> list[IndexReport]:
        """Index many repositories, several at a time: :meth:`add` of each, in ``workers`` worker processes
        (``None``: one per CPU, at most 8, when there are at least 4 repositories for each; ``1``: in this
        process). A repository that cannot be read is reported (``rejected``), not fatal to the others.

        Raises:
            InvalidArgumentError: ``workers`` below 1, or ``storage_options`` that are not JSON with workers (they
                reach the worker processes through a pipe; ``workers=1`` takes any).

        Example::

            reports = cat.add_all([f"s3://bucket/runs/{name}" for name in runs])
            sum(len(r.indexed) for r in reports), [r.repo for r in reports if not r.ok]
        """
        urls = [normalise_url(r) for r in repos]
        return index_many(self.url, self.engine, urls, storage_options, hash_tensors=hash_tensors, full=full,
                          workers=workers)  # fmt: skip

    def sync(self, repo: str | os.PathLike[str] | None = None, storage_options: dict[str, Any] | None = None, *,
             hash_tensors: bool = True, workers: int | None = None) -> list[IndexReport]:  # fmt: skip
        """Index what is new in every known repository (or in ``repo``): one listing of each, and reads of the
        new manifests only, in ``workers`` processes as :meth:`add_all`. A repository that cannot be read is
        reported (``rejected``), not fatal.

        Example::

            for report in cat.sync():
                print(report.repo, len(report.indexed), report.rejected)
        """
        urls = [self._repo_url(repo)] if repo is not None else self.repositories()
        return index_many(self.url, self.engine, urls, storage_options, hash_tensors=hash_tensors, full=False,
                          workers=workers)  # fmt: skip

    def repositories(self) -> list[str]:
        """The URLs of the indexed repositories, in the order they were added."""
        with self.engine.connect() as conn:
            return [str(u) for u in conn.execute(select(t.repositories.c.url).order_by(t.repositories.c.id)).scalars()]

    # --- questions -----------------------------------------------------------------------------------------

    def get(self, checkpoint_id: str) -> CheckpointRecord:
        """The indexed checkpoint with this id (or a unique prefix of at least 4 characters).

        Raises:
            CheckpointNotFoundError: none has it.
        """
        with self.engine.connect() as conn:
            return queries.records(conn, [queries.resolve_id(conn, checkpoint_id, self.url)])[0]

    def where_data(self, name_or_fingerprint: str) -> list[CheckpointRecord]:
        """Checkpoints whose weights saw this dataset (by name or fingerprint): directly, in their data segments
        (``depth`` 0, inherited segments included), or trained, resumed, continued or transferred from one that
        saw it (``depth``: edges from the nearest one).

        Example::

            [r.name for r in cat.where_data("imagenet-train")]
        """
        with self.engine.connect() as conn:
            return queries.where_data(conn, name_or_fingerprint)

    def descendants(self, checkpoint_id: str) -> list[CheckpointRecord]:
        """Every indexed checkpoint that descends from this one, across repositories, nearest first."""
        with self.engine.connect() as conn:
            return queries.descendants(conn, queries.resolve_id(conn, checkpoint_id, self.url))

    def ancestors(self, checkpoint_id: str) -> list[CheckpointRecord]:
        """Every indexed ancestor of this checkpoint, across repositories, nearest first."""
        with self.engine.connect() as conn:
            return queries.ancestors(conn, queries.resolve_id(conn, checkpoint_id, self.url))

    def find(self, path: str | os.PathLike[str]) -> list[FindMatch]:
        """Which indexed checkpoints hold exactly these weights: ``path`` is a ``.safetensors`` file or a folder
        of them (an exported HF folder). Tensors are matched by content (dtype, shape, bytes), not by name;
        exact matches first, then components that hold all of them among more. Only checkpoints indexed with
        ``hash_tensors=True`` while their objects were stored can match.

        Example::

            for m in cat.find("exported/model"):
                print(m.checkpoint.repo, m.checkpoint.name, m.exact)
        """
        wanted = file_tensor_hashes(path)
        with self.engine.connect() as conn:
            return queries.find(conn, wanted)

    def best(self, metric: str, mode: Literal["min", "max"] = "min", repo: str | os.PathLike[str] | None = None, *,
             limit: int = 1, include_archived: bool = False) -> list[CheckpointRecord]:  # fmt: skip
        """The best checkpoints by ``metric`` (lowest for ``"min"``, highest for ``"max"``; nan and infinities
        never count), in ``repo`` or in every repository; committed ones only unless ``include_archived``.

        Example::

            cat.best("val_loss", "min", limit=3)
        """
        if mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode={mode!r}: use 'min' (for a loss) or 'max' (for an accuracy)")
        if not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit={limit!r}: must be a positive integer")
        statuses = None if include_archived else ("committed",)
        with self.engine.connect() as conn:
            rid = self._repo_id(conn, repo)
            return queries.best(conn, metric, mode, repo_id=rid, statuses=statuses, limit=limit)

    def ls(self, repo: str | os.PathLike[str] | None = None, *, relation: str | None = None,
           since: str | datetime | None = None, hparams: dict[str, Any] | None = None,
           status: str | None = None, limit: int | None = None) -> list[CheckpointRecord]:  # fmt: skip
        """Indexed checkpoints, oldest first, filtered by repository, lineage relation (``init``, ``train``,
        ``resume``, ``continue``, ``transfer``, ``import``), creation time (``since``: ISO 8601 or a datetime; no
        offset means UTC), hyperparameter values and status.

        Example::

            cat.ls(relation="continue", hparams={"lr": 0.001}, since="2026-01-01")
        """
        if relation is not None and relation not in ("init", *queries.WEIGHT_RELATIONS):
            raise InvalidArgumentError(f"relation={relation!r}: use one of init, {', '.join(queries.WEIGHT_RELATIONS)}")
        if status is not None and status not in t.STATUSES:
            raise InvalidArgumentError(f"status={status!r}: use one of {', '.join(t.STATUSES)}")
        with self.engine.connect() as conn:
            rid = self._repo_id(conn, repo)
            return queries.listing(conn, repo_id=rid, relation=relation, since=_when(since), hparams=hparams,
                                   statuses=None if status is None else (status,), limit=limit)  # fmt: skip

    # --- helpers -------------------------------------------------------------------------------------------

    def _repo_url(self, repo: str | os.PathLike[str]) -> str:
        url = normalise_url(repo)
        known = self.repositories()
        if url not in known:
            shown = ", ".join(known) or "none"
            raise InvalidArgumentError(f"repository {url} is not in the catalog {self.url}: add it first "
                                       f"(`ckptkit catalog add {url}`); known: {shown}")  # fmt: skip
        return url

    def _repo_id(self, conn: Any, repo: str | os.PathLike[str] | None) -> int | None:
        if repo is None:
            return None
        url = self._repo_url(repo)
        return int(conn.execute(select(t.repositories.c.id).where(t.repositories.c.url == url)).scalar_one())


def _when(since: str | datetime | None) -> datetime | None:
    if since is None or isinstance(since, datetime):
        return since if since is None or since.tzinfo else since.replace(tzinfo=timezone.utc)
    try:
        dt = datetime.fromisoformat(since.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise InvalidArgumentError(f"since={since!r} is not an ISO 8601 date or time (e.g. 2026-01-31 or "
                                   "2026-01-31T12:00:00+00:00)") from err  # fmt: skip
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
