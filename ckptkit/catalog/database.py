"""Where a catalog lives and how it is opened: URL resolution, the SQLAlchemy engine, schema migrations.

One code path for SQLite and PostgreSQL. SQLite: WAL journal, foreign keys on, and write transactions that take
the database's write lock when they begin (``BEGIN IMMEDIATE``), so that two processes indexing at once wait for
each other instead of failing half-way. PostgreSQL (psycopg 3): the schema upgrade holds an advisory lock, and
concurrent inserts of one checkpoint meet on its primary key (``INSERT ... ON CONFLICT``).

Example:
    >>> resolve_url("postgresql://ci@db/catalog")
    'postgresql+psycopg://ci@db/catalog'
    >>> resolve_url("/tmp/c.db")
    'sqlite:////tmp/c.db'
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError as SAArgumentError
from sqlalchemy.exc import NoSuchModuleError, OperationalError

from ckptkit.catalog.tables import VERSION_TABLE
from ckptkit.errors import InvalidArgumentError, MissingDependencyError, StorageError

__all__ = [
    "ENV_VAR",
    "REVISIONS",
    "SCHEMA_REVISION",
    "bulk_insert",
    "current_revision",
    "default_path",
    "insert",
    "mark",
    "open_engine",
    "resolve_url",
    "retrying",
    "shown_url",
    "write",
]

ENV_VAR = "CKPTKIT_CATALOG"
"""The environment variable naming the catalog used when none is given."""
REVISIONS = ("0001",)
"""Every schema revision, oldest first (the ``revision`` of each module in ``_migrations/versions``)."""
SCHEMA_REVISION = REVISIONS[-1]
"""The schema revision this ckptkit writes; a catalog at an older one is upgraded at open, a newer one refused."""
_MIGRATIONS = Path(__file__).with_name("_migrations")
_PG_LOCK = 0x636B70746B6974  # "ckptkit": the advisory lock the schema upgrade holds on PostgreSQL
T = TypeVar("T")


def default_path() -> Path:
    """The default catalog: ``$XDG_DATA_HOME/ckptkit/catalog.db`` (``~/.local/share/ckptkit/catalog.db``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "ckptkit" / "catalog.db"


def resolve_url(url: str | os.PathLike[str] | None) -> str:
    """The SQLAlchemy URL of a catalog: ``None`` is ``$CKPTKIT_CATALOG`` or the default SQLite file, a path an
    SQLite file, ``sqlite:///...`` as it is, ``postgresql://...`` (or ``postgres://``) through psycopg 3.

    Raises:
        InvalidArgumentError: a URL of another database.
    """
    if url is None:
        url = os.environ.get(ENV_VAR) or default_path()
    s = os.fspath(url)
    if not isinstance(s, str) or not s:
        raise InvalidArgumentError(f"catalog URL must be a non-empty path or URL, got {url!r}")
    scheme, sep, rest = s.partition("://")
    if not sep:
        return f"sqlite:///{Path(s).expanduser().resolve()}"
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return f"postgresql+psycopg://{rest}"
    if scheme == "sqlite":
        return s
    raise InvalidArgumentError(f"catalog URL {s!r}: use a file path, sqlite:///PATH or postgresql://USER@HOST/DB "
                               f"(set {ENV_VAR} or pass --catalog)")  # fmt: skip


def open_engine(url: str | os.PathLike[str] | None, *, timeout: float = 60.0) -> Engine:
    """An engine for the catalog at ``url`` (see :func:`resolve_url`) whose schema is at :data:`SCHEMA_REVISION`:
    created on first use, upgraded by the migrations when older.

    ``timeout``: seconds to wait for SQLite's write lock (another writer) or for a PostgreSQL connection.

    Raises:
        InvalidArgumentError: the catalog's schema is newer than this ckptkit (upgrade ckptkit), or the URL is
            not a catalog URL.
        MissingDependencyError: the database driver is not installed.
        StorageError: the database cannot be reached or opened.
    """
    resolved = resolve_url(url)
    if resolved.startswith("sqlite:///") and resolved != "sqlite:///:memory:":
        Path(resolved[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        args: dict[str, Any] = ({"timeout": timeout} if resolved.startswith("sqlite")
                                else {"connect_timeout": max(1, round(timeout))})  # fmt: skip
        engine = create_engine(resolved, connect_args=args)
    except (NoSuchModuleError, ModuleNotFoundError) as err:
        raise MissingDependencyError(f"the catalog at {shown_url(resolved)} needs a database driver that is not "
                                     f"installed ({err}): pip install 'ckptkit[postgres]'") from err  # fmt: skip
    except SAArgumentError as err:
        raise InvalidArgumentError(f"catalog URL {shown_url(resolved)} is not valid: {err}") from err
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    try:
        _upgrade(engine)
    except OperationalError as err:
        engine.dispose()
        raise StorageError(shown_url(resolved), "open catalog", None, str(err.orig)[:300],
                           "check the URL, that the server runs and that you may connect") from err  # fmt: skip
    except BaseException:
        engine.dispose()
        raise
    return engine


def shown_url(url: str) -> str:
    """The URL without its password (for messages and logs).

    Example:
        >>> shown_url("postgresql+psycopg://ci:secret@db/catalog")
        'postgresql+psycopg://ci@db/catalog'
    """
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{auth.split(':')[0]}{at}{host}" if at else url


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the begin listener below says how each transaction starts
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer, nor it them
    # No fsync at each commit, only at WAL checkpoints: a commit survives a crash of the process, and a power cut
    # may only lose the last ones (never corrupt the file); the catalog is rebuilt from the repositories anyway.
    cur.execute("PRAGMA synchronous=NORMAL")
    # Ids are random hashes, so each insert lands anywhere in the key indexes: a page cache of up to 64 MiB (taken
    # as used) keeps them in memory on a large catalog instead of SQLite's default 2 MiB.
    cur.execute("PRAGMA cache_size=-65536")
    # Checkpoint the WAL into the database file every ~200 MiB of it, not SQLite's 4 MiB: a checkpoint writes each
    # page changed since the last one (the random-key indexes change pages all over the file) and fsyncs, so
    # rarer checkpoints write hot pages once instead of many times. Indexing 40,000 manifests here: 836/s with the
    # default, 1,932/s with this. After a checkpoint the WAL file is cut back to 64 MiB.
    cur.execute("PRAGMA wal_autocheckpoint=50000")
    cur.execute("PRAGMA journal_size_limit=67108864")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ckptkit_write") else "BEGIN")


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction (on SQLite it holds the write lock from its start), committed at the
    end of the block, rolled back on an error."""
    with engine.connect() as conn:
        conn.execution_options(ckptkit_write=True)
        with conn.begin():
            yield conn


def retrying(fn: Callable[[], T], attempts: int = 6) -> T:
    """``fn()``, again after a short wait when the database reports a deadlock or a lock that timed out (two
    indexers meeting on PostgreSQL, a long writer on SQLite); each attempt is one whole transaction."""
    for i in range(attempts - 1):
        try:
            return fn()
        except OperationalError:  # psycopg's DeadlockDetected, SQLite's "database is locked"
            time.sleep(0.05 * 2**i)
    return fn()


def insert(conn: Connection, table: Table) -> Any:
    """An INSERT of the connection's dialect that can say ``on_conflict_do_nothing`` / ``on_conflict_do_update``
    (SQLite and PostgreSQL spell it the same)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


_MARKS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def mark(conn: Connection) -> str:
    """The driver's positional parameter mark (``?`` for sqlite3, ``%s`` for psycopg), for statements sent as text.

    Raises:
        InvalidArgumentError: a driver with another parameter style (the catalog runs on SQLite and PostgreSQL).
    """
    style = conn.dialect.paramstyle
    if style not in _MARKS:
        raise InvalidArgumentError(f"the catalog's database driver uses parameter style {style!r}; ckptkit supports "
                                   "sqlite3 and psycopg 3 (sqlite:/// and postgresql:// URLs)")  # fmt: skip
    return _MARKS[style]


def bulk_insert(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], *,
                update: Sequence[str] = ()) -> None:  # fmt: skip
    """Insert ``rows`` (dicts of the same keys) with one ``executemany``: a row whose primary key is there is
    skipped, or, with ``update``, has those columns set from the new row (``ON CONFLICT``: SQLite >= 3.24 and
    PostgreSQL spell it the same).

    The statement goes to the driver as text and each row as a tuple, with the column types' own conversions
    (SQLite's datetimes as SQLAlchemy writes them): building Core statements row by row costs more than the
    database's work on an index of many small rows.
    """
    if not rows:
        return
    keys = list(rows[0])
    dialect = conn.dialect
    if dialect.paramstyle not in _MARKS:  # another driver: let SQLAlchemy bind
        stmt = insert(conn, table)
        if update:
            conn.execute(stmt.on_conflict_do_update(index_elements=[c.name for c in table.primary_key],
                                                    set_={k: stmt.excluded[k] for k in update}), rows)  # fmt: skip
        else:
            conn.execute(stmt.on_conflict_do_nothing(), rows)
        return
    prep = dialect.identifier_preparer
    pk = ", ".join(prep.quote(c.name) for c in table.primary_key)
    action = ("DO UPDATE SET " + ", ".join(f"{prep.quote(k)} = excluded.{prep.quote(k)}" for k in update)
              if update else "DO NOTHING")  # fmt: skip
    sql = (f"INSERT INTO {prep.format_table(table)} ({', '.join(prep.quote(k) for k in keys)}) "
           f"VALUES ({', '.join([mark(conn)] * len(keys))}) ON CONFLICT ({pk}) {action}")  # fmt: skip
    get = itemgetter(*keys)
    data = [get(r) for r in rows] if len(keys) > 1 else [(get(r),) for r in rows]
    for i, k in enumerate(keys):
        f = table.c[k].type.dialect_impl(dialect).bind_processor(dialect)
        if f is not None:
            data = [(*d[:i], None if d[i] is None else f(d[i]), *d[i + 1:]) for d in data]
    conn.exec_driver_sql(sql, data)


def current_revision(conn: Connection) -> str | None:
    """The catalog's schema revision, None for an empty database."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    row = conn.execute(select(text("version_num")).select_from(text(VERSION_TABLE))).first()
    return None if row is None else str(row[0])


def _upgrade(engine: Engine) -> None:
    with engine.connect() as conn:
        rev = current_revision(conn)
        conn.rollback()
    if rev == SCHEMA_REVISION:
        return  # the common case costs one query and no alembic import
    with write(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
        rev = current_revision(conn)  # again, under the lock: another process may have upgraded meanwhile
        if rev == SCHEMA_REVISION:
            return
        if rev is not None and rev not in REVISIONS:
            raise InvalidArgumentError(
                f"catalog {shown_url(str(engine.url))} has schema revision {rev}, newer than this ckptkit knows "
                f"(up to {SCHEMA_REVISION}): upgrade ckptkit (`pip install -U ckptkit`) to use it"
            )
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, SCHEMA_REVISION)
