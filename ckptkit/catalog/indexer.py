"""Indexing: read a repository's manifests, verify them and their parent links, write them to the catalog.

Only what is new is read: the committed names and archived ids the catalog does not hold yet (one listing of
``checkpoints/``, one of ``lineage/``), so a sync of an unchanged repository reads no manifest. A manifest is
indexed only once it verifies (:func:`~ckptkit.schema.parse_manifest`: its bytes are the ones committed and hash
to its id) and every parent it names resolves to a verified manifest (in this repository, in the catalog, or in
the parent's own repository); otherwise it is reported, with why, and left out (so are its descendants: their
chain is broken). Rows are written with ``INSERT ... ON CONFLICT``, so two indexers meeting on one checkpoint
store it once.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from ckptkit.catalog import tables as t
from ckptkit.catalog.database import bulk_insert, insert, retrying, write
from ckptkit.catalog.tensors import safetensors_hashes
from ckptkit.engine.manifests import RepoLike, open_repository
from ckptkit.errors import CheckpointNotFoundError, CorruptObjectError, ManifestError
from ckptkit.hashing import is_hash
from ckptkit.schema import Manifest, canonical_json, dump_manifest, parse_manifest
from ckptkit.storage import Repository

__all__ = ["IndexReport", "index_committed", "index_repository", "normalise_url"]

_CHUNK = 500  # ids per IN (...) clause


@dataclass
class IndexReport:
    """What one :meth:`Catalog.add` or one repository of :meth:`Catalog.sync` did.

    Attributes:
        repo: the repository's URL as the catalog knows it.
        indexed: checkpoints added to the catalog by this run (names; archived ones as ``lineage/<id>``).
        read: manifest files read (new names and archived ids only, plus parents looked up elsewhere).
        rejected: ``(where, why)`` of each manifest not indexed: tampered, unparseable, or with a broken chain.
        objects_hashed: objects read to hash their tensors (for ``find``).
        status: how many of the repository's checkpoints the catalog now holds in each status.
    """

    repo: str
    indexed: list[str] = field(default_factory=list)
    read: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    objects_hashed: int = 0
    status: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every manifest found was indexed."""
        return not self.rejected

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``ckptkit catalog add --json``)."""
        return {"repo": self.repo, "indexed": self.indexed, "read": self.read,
                "rejected": [{"where": w, "why": why} for w, why in self.rejected],
                "objects_hashed": self.objects_hashed, "status": self.status, "ok": self.ok}  # fmt: skip


def normalise_url(url: str | os.PathLike[str]) -> str:
    """A repository URL as the catalog stores it: local paths made absolute, URLs as given, no trailing slash.

    Example:
        >>> normalise_url("s3://bucket/runs/")
        's3://bucket/runs'
    """
    s = os.fspath(url)
    if "://" not in s:
        return os.path.abspath(os.path.expanduser(s))
    return s.rstrip("/")


def _utc(dt: datetime) -> datetime:
    return dt.astimezone(timezone.utc).replace(tzinfo=None)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class _Found:
    manifest: Manifest
    raw: bytes
    where: str
    archived: bool


def _archived_ids(r: Repository) -> list[str]:
    out = []
    for e in r.backend.list("lineage"):
        rest = e.key[len("lineage/"):]
        if "/" not in rest and rest.endswith(".json") and is_hash(rest[:-5]):
            out.append(rest[:-5])
    return out


def _chunks(items: Iterable[str]) -> Iterable[list[str]]:
    batch: list[str] = []
    for i in items:
        batch.append(i)
        if len(batch) == _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _in_catalog(conn: Connection, ids: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for batch in _chunks(sorted(set(ids))):
        out.update(conn.execute(select(t.checkpoints.c.id).where(t.checkpoints.c.id.in_(batch))).scalars())
    return out


class _Parents:
    """Looks parents up in their own repositories (the ones a manifest names by URL), opening each once."""

    def __init__(self, storage_options: dict[str, Any] | None, report: IndexReport) -> None:
        self.options = storage_options
        self.report = report
        self.repos: dict[str, Repository] = {}
        self.verdict: dict[str, str | None] = {}  # parent id -> None when verified, else why not

    def check(self, url: str, pid: str, name: str | None) -> str | None:
        if pid in self.verdict:
            return self.verdict[pid]
        why: str | None = f"not found in {url} (neither under checkpoints/ nor lineage/)"
        try:
            if url not in self.repos:
                self.repos[url] = open_repository(url, self.options)
            r = self.repos[url]
            if name is not None:
                try:
                    self.report.read += 1
                    m = parse_manifest(r.read_manifest(name), f"{r.url}/checkpoints/{name}.json")
                    why = None if m.id == pid else why
                except CheckpointNotFoundError:
                    pass
            if why is not None:
                raw = r.read_archived(pid)
                if raw is not None:
                    self.report.read += 1
                    m = parse_manifest(raw, f"{r.url}/lineage/{pid}.json")
                    why = None if m.id == pid else f"{r.url}/lineage/{pid}.json holds manifest {m.id}"
        except (ManifestError, OSError, ValueError) as err:
            why = str(err)
        self.verdict[pid] = why
        return why


def _verify(found: dict[str, _Found], known: set[str], failed_names: dict[str, str], repo_url: str,
            parents: _Parents) -> dict[str, str | None]:  # fmt: skip
    """Each found manifest's verdict: None when every parent resolves to a verified manifest, else why not."""
    verdict: dict[str, str | None] = {}
    todo = sorted(found, key=lambda i: (found[i].manifest.created_at, found[i].manifest.progress.global_step))
    while todo:
        waiting = []
        for mid in todo:
            m = found[mid].manifest
            why: str | None = None
            wait = False
            for p in m.lineage.parents:
                label = f"parent {p.name or p.id[:12]} ({p.relation}, id {p.id[:12]})"
                if p.id in known or verdict.get(p.id, "x") is None:
                    continue
                if p.id in verdict:
                    why = f"{label} is not intact: {verdict[p.id]}"
                elif p.id in found:
                    wait = True
                    continue
                elif p.url and normalise_url(p.url) != repo_url:
                    problem = parents.check(p.url, p.id, p.name)
                    why = None if problem is None else f"{label} cannot be verified: {problem}"
                elif p.name in failed_names:
                    why = f"{label} failed verification: {failed_names[p.name]}"
                else:
                    why = (f"{label} is not in {repo_url} (neither under checkpoints/ nor lineage/): the chain is "
                           "broken (a manifest deleted or replaced outside ckptkit)")  # fmt: skip
                if why is not None:
                    break
            if why is not None:
                verdict[mid] = why
            elif wait:
                waiting.append(mid)
            else:
                verdict[mid] = None
        if len(waiting) == len(todo):  # parents that never resolve (impossible for real hashes): a broken chain
            for mid in waiting:
                verdict[mid] = "its parents' chain does not resolve"
            break
        todo = waiting
    return verdict


def _insert_checkpoints(conn: Connection, found: Iterable[tuple[Manifest, bytes]]) -> set[str]:
    """Insert checkpoints and what derives from each, a statement per table for the whole batch; the ids that
    were not in the catalog before. Every row derives from its manifest, and an id names one manifest, so a row
    another indexer stored meanwhile is the same row: each insert skips what is there (``ON CONFLICT DO
    NOTHING``) and two indexers meeting on a checkpoint store it once."""
    batch = {m.id: (m, raw) for m, raw in found}
    new = set(batch) - _in_catalog(conn, batch)
    if not new:
        return new
    now = _now()
    rows: dict[Any, list[dict[str, Any]]] = {table: [] for table in _CHILD_TABLES}
    cps = rows[t.checkpoints] = []
    for mid in sorted(new):
        m, raw = batch[mid]
        cps.append({"id": m.id, "name": m.name, "format_version": m.format_version,
                    "created_at": _utc(m.created_at), "relation": m.lineage.relation, "run": m.lineage.run,
                    "epoch": m.progress.epoch, "global_step": m.progress.global_step,
                    "samples_seen": m.progress.samples_seen, "size": sum(o.size for o in m.objects.values()),
                    "manifest": raw.decode(), "indexed_at": now})  # fmt: skip
        rows[t.parents] += [{"child_id": m.id, "position": i, "parent_id": p.id, "relation": p.relation,
                             "parent_name": p.name, "parent_url": p.url} for i, p in enumerate(m.lineage.parents)]
        rows[t.data_segments] += [{"checkpoint_id": m.id, "position": i, "name": d.name, "uri": d.uri,
                                   "fingerprint": d.fingerprint, "size": d.size, "split": d.split,
                                   "samples_consumed": d.samples_consumed} for i, d in enumerate(m.data)]
        rows[t.metrics] += [{"checkpoint_id": m.id, "name": k, "value": v if math.isfinite(v) else None}
                            for k, v in m.metrics.items()]
        rows[t.hparams] += [{"checkpoint_id": m.id, "key": k, "value": canonical_json(v).decode()}
                            for k, v in m.hparams.items()]
        rows[t.checkpoint_objects] += [{"checkpoint_id": m.id, "object": h, "size": o.size}
                                       for h, o in m.objects.items()]
        rows[t.component_tensors] += [{"checkpoint_id": m.id, "component": c, "name": n, "object": ref.object,
                                       "key": ref.key}
                                      for c, comp in m.components.items() if comp.kind == "model"
                                      for n, ref in comp.tensors.items()]  # fmt: skip
    bulk_insert(conn, t.checkpoints, cps)
    for table in _CHILD_TABLES:
        bulk_insert(conn, table, rows[table])
    return new


_CHILD_TABLES = (t.parents, t.data_segments, t.metrics, t.hparams, t.checkpoint_objects, t.component_tensors)


def _known(engine: Engine, url: str) -> int | None:
    with engine.connect() as conn:
        rid = conn.execute(select(t.repositories.c.id).where(t.repositories.c.url == url)).scalar_one_or_none()
    return None if rid is None else int(rid)


def _repository_id(engine: Engine, url: str) -> int:
    known = _known(engine, url)  # a repository the catalog knows needs no write transaction
    if known is not None:
        return known

    def run() -> int:
        with write(engine) as conn:
            conn.execute(insert(conn, t.repositories).values(url=url, added_at=_now())
                         .on_conflict_do_nothing(index_elements=["url"]))  # fmt: skip
            return int(conn.execute(select(t.repositories.c.id).where(t.repositories.c.url == url)).scalar_one())

    return retrying(run)


def index_repository(engine: Engine, url: RepoLike, storage_options: dict[str, Any] | None = None,
                     *, hash_tensors: bool = True, full: bool = False) -> IndexReport:  # fmt: skip
    """Index what is new in the repository at ``url`` (every manifest with ``full``), then bring the status of
    each of its checkpoints up to date (committed, incomplete, archived, removed) from one listing of its
    manifests, archived manifests and objects.

    Args:
        hash_tensors: read the objects of new model components to hash their tensors (what ``find`` matches).
        full: read every manifest again, not only the new names (after a name was deleted and saved anew).
    """
    r = open_repository(url, storage_options)
    key = normalise_url(r.url)
    report = IndexReport(key)
    names = r.list()
    archived = _archived_ids(r)
    if not names and not archived and not _known(engine, key):  # a typo in the URL is not a new, empty repository
        raise CheckpointNotFoundError(r.url, None)
    rid = _repository_id(engine, key)
    with engine.connect() as conn:
        here = {row.checkpoint_id: (row.name, row.status) for row in conn.execute(
            select(t.locations.c.checkpoint_id, t.locations.c.name, t.locations.c.status)
            .where(t.locations.c.repository_id == rid))}  # fmt: skip
        archived_known = _in_catalog(conn, archived)
    by_name = {n: cid for cid, (n, s) in here.items() if s in ("committed", "incomplete")}
    found: dict[str, _Found] = {}
    failed_names: dict[str, str] = {}
    committed_ids: dict[str, str] = {}  # name -> id, for every committed manifest listed and readable
    for n in names:
        if n in by_name and not full:
            committed_ids[n] = by_name[n]
            continue
        where = f"{r.url}/checkpoints/{n}.json"
        try:
            raw = r.read_manifest(n)
            report.read += 1
            m = parse_manifest(raw, where)
            if m.name != n:
                raise ManifestError(where, f"it names itself {m.name!r}, but it is stored as {n!r}: a manifest was "
                                           "copied or renamed outside ckptkit")  # fmt: skip
        except CheckpointNotFoundError:
            continue  # deleted while we listed
        except ManifestError as err:
            report.rejected.append((where, str(err)))
            failed_names[n] = str(err)
            continue
        committed_ids[n] = m.id
        found[m.id] = _Found(m, raw, where, archived=False)
    for aid in archived:
        if (aid in archived_known and not full) or aid in found:
            continue
        where = f"{r.url}/lineage/{aid}.json"
        raw_a = r.read_archived(aid)
        if raw_a is None:
            continue
        report.read += 1
        try:
            m = parse_manifest(raw_a, where)
            if m.id != aid:
                raise ManifestError(where, f"it holds manifest {m.id} ({m.name!r}), not {aid}: an archived manifest "
                                           "was copied or renamed outside ckptkit")  # fmt: skip
        except ManifestError as err:
            report.rejected.append((where, str(err)))
            continue
        found[aid] = _Found(m, raw_a, where, archived=True)

    parent_ids = {p.id for f in found.values() for p in f.manifest.lineage.parents}
    with engine.connect() as conn:
        known = _in_catalog(conn, parent_ids)
    verdict = _verify(found, known, failed_names, key, _Parents(storage_options, report))
    for mid, why in verdict.items():
        if why is not None:
            report.rejected.append((found[mid].where, why))
    good = sorted(mid for mid, why in verdict.items() if why is None)
    listed_committed = set(committed_ids.values()) - {mid for mid, why in verdict.items() if why is not None}
    archived_set = set(archived)

    def write_rows() -> list[str]:
        indexed = []
        with write(engine) as conn:
            now = _now()
            new = _insert_checkpoints(conn, ((found[mid].manifest, found[mid].raw) for mid in good))
            for mid in good:
                f = found[mid]
                if mid in new or mid not in here:
                    indexed.append(f.manifest.name if not f.archived else f"lineage/{mid}")
            # every location of this repository, from the listings: committed wins over archived
            status: dict[str, tuple[str, str]] = {}
            names_of = {mid: found[mid].manifest.name for mid in good}
            for mid in archived_set & (archived_known | set(good)):
                status[mid] = (names_of.get(mid) or here.get(mid, ("", ""))[0], "archived")
            for n, mid in committed_ids.items():
                if mid in listed_committed and (mid in good or mid in here):
                    prev = here.get(mid, ("", "committed"))[1]
                    status[mid] = (n, prev if prev in ("committed", "incomplete") else "committed")
            missing_names = [mid for mid in archived_set & archived_known if mid not in here]
            if missing_names:
                for row in conn.execute(select(t.checkpoints.c.id, t.checkpoints.c.name)
                                        .where(t.checkpoints.c.id.in_(missing_names))):  # fmt: skip
                    status[row.id] = (row.name, "archived")
            for mid, (name, _s) in here.items():
                if mid not in status:
                    status[mid] = (name, "removed")
            # only the locations whose name or status changed are written (seen_at: when that happened); that
            # all the others were confirmed now is the repository's synced_at, one row
            changed = [{"repository_id": rid, "checkpoint_id": mid, "name": name, "status": st, "objects_missing": 0,
                        "seen_at": now} for mid, (name, st) in sorted(status.items()) if here.get(mid) != (name, st)]
            bulk_insert(conn, t.locations, changed, update=("name", "status", "seen_at"))
            conn.execute(update(t.repositories).where(t.repositories.c.id == rid).values(synced_at=now))
        return indexed

    report.indexed = retrying(write_rows)
    _check_objects(engine, r, rid)
    if hash_tensors:
        report.objects_hashed = _hash_tensors(engine, r, rid)
    with engine.connect() as conn:
        for row in conn.execute(select(t.locations.c.status).where(t.locations.c.repository_id == rid)):
            report.status[row.status] = report.status.get(row.status, 0) + 1
    return report


def _check_objects(engine: Engine, r: Repository, rid: int) -> None:
    """Count each checkpoint's missing objects against one listing; committed <-> incomplete follows."""
    stored = set(r.list_objects())
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.locations.c.checkpoint_id, t.locations.c.status, t.locations.c.objects_missing,
                   t.checkpoint_objects.c.object)
            .join(t.checkpoint_objects, t.checkpoint_objects.c.checkpoint_id == t.locations.c.checkpoint_id,
                  isouter=True)
            .where(t.locations.c.repository_id == rid, t.locations.c.status != "removed")
        ).all()  # fmt: skip
    missing: dict[str, int] = {}
    before: dict[str, tuple[str, int]] = {}
    for row in rows:
        before[row.checkpoint_id] = (row.status, row.objects_missing)
        gone = row.object is not None and row.object not in stored
        missing[row.checkpoint_id] = missing.get(row.checkpoint_id, 0) + gone
    changes = []
    for cid, n in missing.items():
        st, prev = before[cid]
        new = st if st == "archived" else ("incomplete" if n else "committed")
        if (new, n) != (st, prev):
            changes.append((cid, new, n))
    if not changes:
        return

    def run() -> None:
        with write(engine) as conn:
            for cid, st, n in sorted(changes):
                conn.execute(update(t.locations).where(t.locations.c.repository_id == rid,
                                                       t.locations.c.checkpoint_id == cid)
                             .values(status=st, objects_missing=n))  # fmt: skip

    retrying(run)


def _hash_tensors(engine: Engine, r: Repository, rid: int) -> int:
    """Hash the tensors of every object a committed model component here references and the catalog has not
    hashed yet (an object is named by its content: once is enough, for every repository)."""
    with engine.connect() as conn:
        hashed = select(t.object_tensors.c.object).distinct()
        todo = conn.execute(
            select(t.component_tensors.c.object, t.checkpoint_objects.c.size).distinct()
            .join(t.locations, t.locations.c.checkpoint_id == t.component_tensors.c.checkpoint_id)
            .join(t.checkpoint_objects, (t.checkpoint_objects.c.checkpoint_id == t.component_tensors.c.checkpoint_id)
                  & (t.checkpoint_objects.c.object == t.component_tensors.c.object))
            .where(t.locations.c.repository_id == rid, t.locations.c.status == "committed",
                   t.component_tensors.c.object.not_in(hashed))
        ).all()  # fmt: skip
    done = 0
    for obj, size in sorted(set(todo)):
        try:
            hashes = safetensors_hashes(r.read_object(obj, size), posixpath.join(r.url, "objects", obj))
        except (FileNotFoundError, CorruptObjectError):
            continue  # deleted meanwhile, or damaged: `ckptkit verify` reports it; find will not match it
        rows = [{"object": obj, "key": k, "tensor_hash": h.tensor_hash, "dtype": h.dtype,
                 "shape": json.dumps(list(h.shape))} for k, h in sorted(hashes.items())]  # fmt: skip

        def run(rows: list[dict[str, Any]] = rows) -> None:
            with write(engine) as conn:
                conn.execute(insert(conn, t.object_tensors).on_conflict_do_nothing(), rows)

        retrying(run)
        done += 1
    return done


def index_committed(engine: Engine, repo: RepoLike, manifest: Manifest, *, retired: Iterable[str] = (),
                    storage_options: dict[str, Any] | None = None,
                    hash_tensors: bool = False) -> IndexReport:  # fmt: skip
    """Index a manifest its writer just committed to ``repo`` (``name`` under ``checkpoints/``, every object
    stored), without reading the repository when every parent is in the catalog; mark ``retired`` (names the same
    save pruned to ``lineage/``) archived.

    The manifest is checked as :func:`index_repository` checks what it reads: its canonical bytes must hash to its
    id, and each parent must be a verified manifest. A parent the catalog does not hold (a repository used before
    the catalog, a parent in a repository not indexed) makes it index the whole repository instead, which verifies
    the chain from the manifests as stored.

    Raises:
        ManifestError: the manifest's bytes do not hash to its id.
        StorageError: the catalog (or, for the whole-repository case, the repository) cannot be reached.
        sqlalchemy.exc.OperationalError: the catalog is locked or went away during the write.
    """
    r = open_repository(repo, storage_options)
    key = normalise_url(r.url)
    raw = dump_manifest(manifest)
    m = parse_manifest(raw, f"{r.url}/checkpoints/{manifest.name}.json")  # the id is the hash of these bytes
    with engine.connect() as conn:
        known = _in_catalog(conn, [p.id for p in m.lineage.parents])
    if any(p.id not in known for p in m.lineage.parents):
        return index_repository(engine, r, None if isinstance(repo, Repository) else storage_options,
                                hash_tensors=hash_tensors)  # fmt: skip
    report = IndexReport(key, read=0)
    rid = _repository_id(engine, key)
    gone = sorted(set(retired) - {m.name})

    def run() -> bool:
        with write(engine) as conn:
            now = _now()
            new = bool(_insert_checkpoints(conn, [(m, raw)]))
            bulk_insert(conn, t.locations, [{"repository_id": rid, "checkpoint_id": m.id, "name": m.name,
                                             "status": "committed", "objects_missing": 0, "seen_at": now}],
                        update=("name", "status", "objects_missing", "seen_at"))  # fmt: skip
            if gone:
                loc = t.locations.c
                conn.execute(update(t.locations).where(loc.repository_id == rid, loc.name.in_(gone),
                                                       loc.checkpoint_id != m.id,
                                                       loc.status.in_(("committed", "incomplete")))
                             .values(status="archived", seen_at=now))  # fmt: skip
            return new

    if retrying(run):
        report.indexed.append(m.name)
    if hash_tensors:
        report.objects_hashed = _hash_tensors(engine, r, rid)
    return report
