"""The catalog's questions, as SQL that SQLite and PostgreSQL both run (recursive CTEs for lineage).

Every query returns :class:`CheckpointRecord` rows built from the same few selects, so the CLI's tables and
``--json`` show the same fields for every verb.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import Connection, Select, and_, exists, func, literal, or_, select

from ckptkit.catalog import tables as t
from ckptkit.catalog.database import mark
from ckptkit.catalog.tensors import TensorHash
from ckptkit.errors import CheckpointNotFoundError, InvalidArgumentError
from ckptkit.schema import canonical_json

__all__ = [
    "WEIGHT_RELATIONS",
    "CheckpointRecord",
    "FindMatch",
    "Location",
    "ancestors",
    "best",
    "descendants",
    "find",
    "listing",
    "records",
    "resolve_id",
    "where_data",
]

WEIGHT_RELATIONS = ("train", "resume", "continue", "transfer", "import")
"""Edges along which weights flow from a parent into its child (every relation but ``init``, which has no parent):
what :func:`where_data` follows from a checkpoint that saw the data to the checkpoints trained from it."""
_STATUS_ORDER = {s: i for i, s in enumerate(t.STATUSES)}
_CHUNK = 500


@dataclass(frozen=True)
class Location:
    """Where a checkpoint is, or was: a repository, its name there and its status (see ``tables.STATUSES``)."""

    repo: str
    name: str
    status: str
    objects_missing: int = 0


@dataclass(frozen=True)
class CheckpointRecord:
    """One indexed checkpoint: its manifest's id and summary, and where it lives.

    ``repo``, ``name`` and ``status`` are those of its first location (in the repository a query was limited to,
    else committed before incomplete, archived and removed); ``locations`` lists them all. ``depth`` is the
    number of lineage edges from the checkpoint a lineage query started at (0: that checkpoint, or one that saw
    the data itself), None for other queries.
    """

    id: str
    name: str
    repo: str
    status: str
    relation: str
    created_at: datetime
    epoch: int
    global_step: int
    samples_seen: int
    size: int
    metrics: dict[str, float | None] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    parents: list[tuple[str, str]] = field(default_factory=list)  # (parent id, relation)
    locations: tuple[Location, ...] = ()
    depth: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (``--json`` output); ``created_at`` in ISO 8601 with its offset."""
        return {"id": self.id, "name": self.name, "repo": self.repo, "status": self.status,
                "relation": self.relation, "created_at": self.created_at.isoformat(), "epoch": self.epoch,
                "global_step": self.global_step, "samples_seen": self.samples_seen, "size": self.size,
                "metrics": self.metrics, "hparams": self.hparams, "data": self.data,
                "parents": [{"id": i, "relation": r} for i, r in self.parents],
                "locations": [vars(loc) for loc in self.locations], "depth": self.depth}  # fmt: skip


@dataclass(frozen=True)
class FindMatch:
    """A checkpoint whose model component holds the tensors looked for: all of them and nothing else
    (``exact``), or all of them among more (the file is part of the model: an export that left tensors out)."""

    checkpoint: CheckpointRecord
    component: str
    exact: bool
    matched: int
    tensors: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (``--json`` output)."""
        return {"component": self.component, "exact": self.exact, "matched": self.matched,
                "tensors": self.tensors, **self.checkpoint.to_json()}  # fmt: skip


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def records(conn: Connection, ids: Sequence[str], *, repo_id: int | None = None,
            depth: Mapping[str, int] | None = None) -> list[CheckpointRecord]:  # fmt: skip
    """The records of ``ids``, in that order (ids not in the catalog are left out).

    Three statements per :data:`_CHUNK` ids (the checkpoints, their locations, and one ``UNION ALL`` of their
    metrics, hyperparameters, data and parents), sent as text with the rows read as plain tuples: on PostgreSQL
    each statement is a round trip, and on both building SQLAlchemy rows cost more than the database's work.
    """
    ids = list(dict.fromkeys(ids))
    base: dict[str, Any] = {}  # id -> (id, name, relation, created_at, epoch, global_step, samples_seen, size)
    locs: dict[str, list[tuple[int, Location]]] = {}
    mets: dict[str, dict[str, float | None]] = {}
    hps: dict[str, dict[str, Any]] = {}
    data: dict[str, list[tuple[int, str]]] = {}
    pars: dict[str, list[tuple[int, tuple[str, str]]]] = {}
    for batch in _chunks(ids):
        args = tuple(batch)
        within = f"IN ({', '.join([mark(conn)] * len(batch))})"
        for crow in conn.exec_driver_sql(
                "SELECT id, name, relation, created_at, epoch, global_step, samples_seen, size "
                f"FROM {t.checkpoints.name} WHERE id {within}", args):  # fmt: skip
            base[crow[0]] = crow
        for cid, rid, url, name, status, missing in conn.exec_driver_sql(
                "SELECT l.checkpoint_id, l.repository_id, r.url, l.name, l.status, l.objects_missing "
                f"FROM {t.locations.name} l JOIN {t.repositories.name} r ON r.id = l.repository_id "
                f"WHERE l.checkpoint_id {within}", args):  # fmt: skip
            locs.setdefault(cid, []).append((rid, Location(url, name, status, missing)))
        no_text, no_real = "CAST(NULL AS TEXT)", "CAST(NULL AS DOUBLE PRECISION)"
        rest = (f'SELECT 0, checkpoint_id, name, {no_text}, value, 0 FROM {t.metrics.name} '
                f"WHERE checkpoint_id {within} "
                f'UNION ALL SELECT 1, checkpoint_id, "key", "value", {no_real}, 0 FROM {t.hparams.name} '
                f"WHERE checkpoint_id {within} "
                f'UNION ALL SELECT 2, checkpoint_id, name, {no_text}, {no_real}, "position" FROM '
                f"{t.data_segments.name} WHERE checkpoint_id {within} "
                f'UNION ALL SELECT 3, child_id, parent_id, relation, {no_real}, "position" FROM {t.parents.name} '
                f"WHERE child_id {within}")  # fmt: skip
        for kind, cid, a, b, value, pos in conn.exec_driver_sql(rest, args * 4):
            if kind == 0:
                mets.setdefault(cid, {})[a] = value
            elif kind == 1:
                hps.setdefault(cid, {})[a] = json.loads(b)
            elif kind == 2:
                data.setdefault(cid, []).append((pos, a))
            else:
                pars.setdefault(cid, []).append((pos, (a, b)))
    out = []
    for cid in ids:
        if cid not in base:
            continue
        _, name, relation, created, epoch, step, seen, size = base[cid]
        ordered = sorted(locs.get(cid, []), key=lambda rl: (rl[0] != repo_id, _STATUS_ORDER.get(rl[1].status, 9),
                                                             rl[1].repo))  # fmt: skip
        first = ordered[0][1] if ordered else Location("", name, "removed")
        if isinstance(created, str):  # SQLite keeps it as text (UTC, without offset)
            created = datetime.fromisoformat(created)
        out.append(CheckpointRecord(
            id=cid, name=first.name, repo=first.repo, status=first.status, relation=relation,
            created_at=created.replace(tzinfo=timezone.utc), epoch=epoch, global_step=step, samples_seen=seen,
            size=size, metrics=mets.get(cid, {}), hparams=hps.get(cid, {}),
            data=[n for _, n in sorted(data.get(cid, []))], parents=[p for _, p in sorted(pars.get(cid, []))],
            locations=tuple(loc for _, loc in ordered), depth=None if depth is None else depth.get(cid)))  # fmt: skip
    return out


def resolve_id(conn: Connection, id_or_prefix: str, catalog: str) -> str:
    """The full id of an indexed checkpoint from its id or a unique prefix of it (at least 4 characters).

    Raises:
        CheckpointNotFoundError: no indexed checkpoint has that id.
        InvalidArgumentError: the prefix is shorter than 4 characters or names several checkpoints.
    """
    s = id_or_prefix.strip().lower()
    if len(s) < 4 or any(c not in "0123456789abcdef" for c in s):
        raise InvalidArgumentError(f"{id_or_prefix!r} is not a checkpoint id: give the id (64 hex characters, "
                                   "`ckptkit show URL` prints it) or at least its first 4")  # fmt: skip
    hits = list(conn.execute(select(t.checkpoints.c.id).where(t.checkpoints.c.id.like(f"{s}%")).limit(5)).scalars())
    if not hits:
        raise CheckpointNotFoundError(catalog, id_or_prefix)
    if len(hits) > 1:
        shown = ", ".join(h[:16] for h in hits)
        raise InvalidArgumentError(f"id prefix {id_or_prefix!r} names several checkpoints ({shown} ...): give more "
                                   "of the id")  # fmt: skip
    return str(hits[0])


def _ordered(conn: Connection, depth: Mapping[str, int], repo_id: int | None = None) -> list[CheckpointRecord]:
    recs = records(conn, list(depth), repo_id=repo_id, depth=depth)
    return sorted(recs, key=lambda r: (r.depth or 0, r.created_at, r.global_step, r.id))


def _walk(conn: Connection, seed: Select[Any], up: bool, relations: Sequence[str] | None,
          stop: Callable[[Any], Any] | None = None) -> dict[str, int]:  # fmt: skip
    """ids -> fewest edges from ``seed`` (a select of ``id, depth``), following parent links up or down, never
    stepping onto an id for which ``stop(id column)`` is false (the seeds themselves, when they are many: each
    seed is then walked from once, not once from every seed above it, which on a chain of n seeds would make
    n**2 / 2 rows)."""
    cte = seed.cte("walk", recursive=True)
    p = t.parents
    nxt, prev = (p.c.parent_id, p.c.child_id) if up else (p.c.child_id, p.c.parent_id)
    step = select(nxt.label("id"), (cte.c.depth + 1).label("depth")).join(cte, prev == cte.c.id)
    if relations is not None:
        step = step.where(p.c.relation.in_(relations))
    if stop is not None:
        step = step.where(stop(nxt))
    cte = cte.union(step)
    q = select(cte.c.id, func.min(cte.c.depth)).group_by(cte.c.id)
    if conn.dialect.name == "postgresql":
        # PostgreSQL guesses the walk's working table large and joins it to all of `parents` by hashing (a full
        # scan of the table at every step of the walk: 0.2 s on 100,000 checkpoints). Each step is a few ids:
        # an index lookup per id is what fits. For this transaction only.
        conn.exec_driver_sql("SET LOCAL enable_hashjoin = off")
        conn.exec_driver_sql("SET LOCAL enable_mergejoin = off")
    return {str(i): int(d) for i, d in conn.execute(q)}


def where_data(conn: Connection, needle: str) -> list[CheckpointRecord]:
    """Checkpoints whose weights saw the dataset named ``needle`` (its name or its fingerprint): those that list
    it among their data segments (depth 0) and those trained from one of them along :data:`WEIGHT_RELATIONS`
    edges (depth = edges from the nearest that lists it). Oldest first within each depth."""
    seg = t.data_segments
    saw = or_(seg.c.name == needle, seg.c.fingerprint == needle)
    seed = select(seg.c.checkpoint_id.label("id"), literal(0).label("depth")).where(saw).distinct()

    def unseen(cid: Any) -> Any:  # an index probe per child, not a scan
        return ~exists(select(literal(1)).select_from(seg).where(seg.c.checkpoint_id == cid, saw))

    return _ordered(conn, _walk(conn, seed, up=False, relations=WEIGHT_RELATIONS, stop=unseen))


def descendants(conn: Connection, cid: str) -> list[CheckpointRecord]:
    """Every indexed checkpoint that descends from ``cid`` by any relation, in any repository, nearest first."""
    seed = select(t.parents.c.child_id.label("id"), literal(1).label("depth")).where(t.parents.c.parent_id == cid)
    return _ordered(conn, _walk(conn, seed, up=False, relations=None))


def ancestors(conn: Connection, cid: str) -> list[CheckpointRecord]:
    """Every indexed ancestor of ``cid``, in any repository, nearest first (parents not indexed are left out)."""
    seed = select(t.parents.c.parent_id.label("id"), literal(1).label("depth")).where(t.parents.c.child_id == cid)
    return _ordered(conn, _walk(conn, seed, up=True, relations=None))


def _located(repo_id: int | None, statuses: Sequence[str] | None) -> Any:
    cond = [t.locations.c.checkpoint_id == t.checkpoints.c.id]
    if repo_id is not None:
        cond.append(t.locations.c.repository_id == repo_id)
    if statuses is not None:
        cond.append(t.locations.c.status.in_(statuses))
    return exists(select(literal(1)).select_from(t.locations).where(and_(*cond)))


def best(conn: Connection, metric: str, mode: Literal["min", "max"], *, repo_id: int | None = None,
         statuses: Sequence[str] | None = ("committed",), limit: int = 1) -> list[CheckpointRecord]:  # fmt: skip
    """The ``limit`` checkpoints with the lowest (``min``) or highest (``max``) finite value of ``metric``, among
    those in ``statuses`` (restorable ones by default), newest first among equals."""
    m = t.metrics
    order = m.c.value.asc() if mode == "min" else m.c.value.desc()
    q = (select(t.checkpoints.c.id).join(m, m.c.checkpoint_id == t.checkpoints.c.id)
         .where(m.c.name == metric, m.c.value.is_not(None), _located(repo_id, statuses))
         .order_by(order, t.checkpoints.c.created_at.desc(), t.checkpoints.c.id).limit(limit))  # fmt: skip
    return records(conn, list(conn.execute(q).scalars()), repo_id=repo_id)


def listing(conn: Connection, *, repo_id: int | None = None, relation: str | None = None,
            since: datetime | None = None, hparams: Mapping[str, Any] | None = None,
            statuses: Sequence[str] | None = None, limit: int | None = None) -> list[CheckpointRecord]:  # fmt: skip
    """Indexed checkpoints, oldest first, filtered: in a repository, by the relation of their lineage edge,
    created at or after ``since``, with these hyperparameter values (compared as canonical JSON), in ``statuses``."""
    c = t.checkpoints.c
    q = select(c.id)
    if repo_id is not None or statuses is not None:
        q = q.where(_located(repo_id, statuses))
    if relation is not None:
        q = q.where(c.relation == relation)
    if since is not None:
        q = q.where(c.created_at >= since.astimezone(timezone.utc).replace(tzinfo=None))
    for k, v in (hparams or {}).items():
        q = q.where(exists(select(literal(1)).select_from(t.hparams).where(
            t.hparams.c.checkpoint_id == c.id, t.hparams.c.key == k, t.hparams.c.value == canonical_json(v).decode())))
    q = q.order_by(c.created_at, c.global_step, c.id)
    if limit is not None:
        q = q.limit(limit)
    return records(conn, list(conn.execute(q).scalars()), repo_id=repo_id)


def find(conn: Connection, wanted: Mapping[str, TensorHash]) -> list[FindMatch]:
    """Model components that hold every tensor of ``wanted`` (by content hash), exact ones first."""
    hashes = sorted({h.tensor_hash for h in wanted.values()})
    where: dict[tuple[str, str], str] = {}  # (object, key) -> tensor hash, for the tensors looked for
    for batch in _chunks(hashes):
        for row in conn.execute(select(t.object_tensors.c.object, t.object_tensors.c.key,
                                       t.object_tensors.c.tensor_hash)
                                .where(t.object_tensors.c.tensor_hash.in_(batch))):  # fmt: skip
            where[(row.object, row.key)] = row.tensor_hash
    objects = sorted({o for o, _ in where})
    seen: dict[tuple[str, str], set[str]] = {}
    for batch in _chunks(objects):
        ct = t.component_tensors
        for crow in conn.execute(select(ct.c.checkpoint_id, ct.c.component, ct.c.object, ct.c.key)
                                 .where(ct.c.object.in_(batch))):  # fmt: skip
            h = where.get((crow.object, crow.key))
            if h is not None:
                seen.setdefault((crow.checkpoint_id, crow.component), set()).add(h)
    hits = sorted(k for k, v in seen.items() if len(v) == len(hashes))
    if not hits:
        return []
    ct, ot = t.component_tensors, t.object_tensors
    totals: dict[tuple[str, str], tuple[set[str | None], int]] = {}
    for batch in _chunks(sorted({cid for cid, _ in hits})):
        q = (select(ct.c.checkpoint_id, ct.c.component, ot.c.tensor_hash)
             .join(ot, (ot.c.object == ct.c.object) & (ot.c.key == ct.c.key), isouter=True)
             .where(ct.c.checkpoint_id.in_(batch)))  # fmt: skip
        for trow in conn.execute(q):
            got, n = totals.get((trow.checkpoint_id, trow.component), (set(), 0))
            got.add(trow.tensor_hash)
            totals[(trow.checkpoint_id, trow.component)] = (got, n + 1)
    recs = {r.id: r for r in records(conn, [cid for cid, _ in hits])}
    out = []
    for cid, comp in hits:
        got, _n = totals[(cid, comp)]
        exact = None not in got and got == set(hashes)
        out.append(FindMatch(recs[cid], comp, exact, len(hashes), len(got)))
    out.sort(key=lambda f: (not f.exact, f.checkpoint.created_at, f.checkpoint.id))
    return out
