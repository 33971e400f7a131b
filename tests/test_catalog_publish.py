"""Indexing at save time (ckptkit.catalog.publish.CommitIndexer) and the catalog benchmark's smoke run.

The saves go through ``CheckpointManager(..., catalog=URL)``: a CommitIndexer created with the manager,
``submit`` after each commit (with the names its retention pruned), ``close`` in ``close``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.catalog import Catalog
from ckptkit.catalog.publish import CommitIndexer
from ckptkit.errors import InvalidArgumentError
from ckptkit.schema import Environment, Lineage, Manifest, Parent, build_manifest, dump_manifest
from ckptkit.storage import Repository

ROOT = Path(__file__).resolve().parent.parent


def CatalogManager(url: str, state: dict[str, Any], *, catalog: str | None = None, timeout: float = 2.0,
                   **kw: Any) -> ckptkit.CheckpointManager:  # fmt: skip
    """``CheckpointManager(..., catalog=URL)``, its indexer's database timeout set to ``timeout``."""
    mgr = ckptkit.CheckpointManager(url, state, catalog=catalog, **kw)
    if mgr._catalog is not None:
        mgr._catalog.timeout = timeout
    mgr._test_catalog = mgr._catalog  # type: ignore[attr-defined]
    return mgr


def _load_pgserver() -> ModuleType:
    name = "ckptkit_tests_pgserver"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("pgserver.py"))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    pgserver = _load_pgserver()
    try:
        server = pgserver.PgServer.start()
    except pgserver.PgUnavailable as err:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"PostgreSQL is needed in CI: {err}")
        pytest.skip(f"PostgreSQL not available: {err}")
    yield server
    server.stop()


def _state() -> dict[str, Any]:
    model = torch.nn.Linear(4, 2)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def _bump(state: dict[str, Any]) -> None:
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(0.01)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/catalog"  # nothing listens there now: connection refused


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder no file can be created in, by this user (root ignores permissions: then sysfs, read-only)."""
    for d in (tmp_path / "ro", Path("/sys")):
        if d.parent == tmp_path:
            d.mkdir()
            d.chmod(0o555)
        probe = d / f"probe-{uuid.uuid4().hex}"
        try:
            probe.touch()
        except OSError:
            return d
        probe.unlink()
    pytest.skip("no folder here refuses this user's writes")


def _messages(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# --- saves with a catalog ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sqlite", "sqlite-async", "postgresql"])
def test_saves_with_a_catalog_are_indexed_as_sync_would(mode: str, tmp_path: Path, request: Any) -> None:
    url = str(request.getfixturevalue("pg").create_database()) if mode == "postgresql" else str(tmp_path / "c.db")
    repo = str(tmp_path / "run")
    state = _state()
    mgr = CatalogManager(repo, state, catalog=url, retention=ckptkit.Retention(keep_last=2),
                         async_save=mode.endswith("async"), hparams={"lr": 0.1})  # fmt: skip
    for step in (1, 2, 3, 4):
        _bump(state)
        mgr.save(step, metrics={"loss": 1.0 / step})
    indexer = mgr._test_catalog
    assert indexer is not None
    mgr.close()
    assert (indexer.indexed, indexer.dropped, indexer.rejected) == (4, 0, 0)
    with Catalog(url) as cat:
        got = {r.name: r.status for r in cat.ls(repo)}
        assert got == {"step-00000001": "archived", "step-00000002": "archived", "step-00000003": "committed",
                       "step-00000004": "committed"}  # fmt: skip
        last = cat.best("loss", "min")[0]
        assert last.name == "step-00000004" and last.hparams == {"lr": 0.1}
        assert [r.name for r in cat.ancestors(last.id)] == ["step-00000003", "step-00000002", "step-00000001"]
        (report,) = cat.sync(hash_tensors=False)  # what a sync finds is what save time indexed
        assert report.indexed == [] and report.ok
        assert {r.name: r.status for r in cat.ls(repo)} == got


# --- a catalog that is down -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["postgresql-closed-port", "sqlite-read-only-folder"])
def test_an_unreachable_catalog_neither_fails_nor_slows_saves(where: str, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    url = _closed_port_url() if where.startswith("postgresql") else str(_read_only_dir(tmp_path) / "c.db")
    caplog.set_level(logging.WARNING, logger="ckptkit")
    plain_state, cat_state = _state(), _state()
    plain = ckptkit.CheckpointManager(str(tmp_path / "plain"), plain_state)
    mgr = CatalogManager(str(tmp_path / "run"), cat_state, catalog=url)
    blocked: dict[str, list[float]] = {"plain": [], "catalog": []}
    for step in range(1, 13):  # interleaved, so that the machine's other work weighs on both alike
        for key, m, st in (("plain", plain, plain_state), ("catalog", mgr, cat_state)):
            _bump(st)
            start = time.perf_counter()
            saved = m.save(step)
            blocked[key].append(time.perf_counter() - start)
            assert saved is not None and saved.name == f"step-{step:08d}"
    extra = statistics.median(blocked["catalog"][2:]) - statistics.median(blocked["plain"][2:])
    print(f"{where}: save blocks {statistics.median(blocked['plain'][2:]) * 1000:.2f} ms without a catalog, "
          f"{extra * 1000:+.2f} ms with it unreachable (medians of 10)")
    assert extra < 0.020, f"saves with an unreachable catalog blocked {extra * 1000:.1f} ms longer"
    indexer = mgr._test_catalog
    assert indexer is not None
    start = time.perf_counter()
    mgr.close()
    plain.close()
    assert time.perf_counter() - start < 5.0, "close waited on the unreachable catalog"
    assert (indexer.indexed, indexer.dropped) == (0, 12)
    assert len(_messages(caplog, "unreachable (")) == 1, caplog.text  # once per outage, not once per save
    assert _messages(caplog, "12 checkpoint(s)") and "catalog add" in _messages(caplog, "12 checkpoint(s)")[0]
    assert len(ckptkit.checkpoints(str(tmp_path / "run"))) == 12


def test_a_locked_catalog_is_retried_and_sync_indexes_what_was_dropped(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    db, repo = str(tmp_path / "c.db"), str(tmp_path / "run")
    caplog.set_level(logging.WARNING, logger="ckptkit")
    state = _state()
    mgr = CatalogManager(repo, state, catalog=db, timeout=0.2)
    _bump(state)
    mgr.save(1)
    indexer = mgr._test_catalog
    assert indexer is not None and indexer.flush(30) and indexer.indexed == 1
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the catalog: the indexer's writes time out
    for step in (2, 3, 4):
        _bump(state)
        mgr.save(step)
    deadline = time.monotonic() + 20
    while not _messages(caplog, "unreachable (") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert indexer.indexed == 1 and indexer.pending == 3
    lock.execute("ROLLBACK")  # the lock is gone: the queued ones are indexed, without a sync
    deadline = time.monotonic() + 30
    while indexer.pending and time.monotonic() < deadline:  # flush() does not wait on an outage: poll
        time.sleep(0.05)
    assert indexer.indexed == 4 and _messages(caplog, "reachable again")
    lock.execute("BEGIN IMMEDIATE")  # locked again, and the run ends before it is released
    for step in (5, 6):
        _bump(state)
        mgr.save(step)
    mgr.close()  # the lock outlasts close: two checkpoints dropped, logged
    lock.execute("ROLLBACK")
    lock.close()
    assert indexer.dropped == 2 and _messages(caplog, "2 checkpoint(s)")
    with Catalog(db) as cat:
        assert len(cat.ls(repo)) == 4
        (report,) = cat.sync(hash_tensors=False)
        assert sorted(report.indexed) == ["step-00000005", "step-00000006"]
        assert [r.name for r in cat.ls(repo)] == [f"step-{s:08d}" for s in range(1, 7)]


# --- the indexer on its own -------------------------------------------------------------------------------

_ENV = Environment(ckptkit="0", torch="0", python="3", platform="test")


def _chain(repo: Repository, n: int) -> list[Manifest]:
    out: list[Manifest] = []
    for i in range(1, n + 1):
        parents = [Parent(id=out[-1].id, relation="train", name=out[-1].name)] if out else []
        m = build_manifest(name=f"step-{i}", created_at=f"2026-01-01T00:00:{i:02d}+00:00", environment=_ENV,
                           lineage=Lineage(relation="train" if parents else "init", parents=parents))  # fmt: skip
        repo.commit(m.name, dump_manifest(m))
        out.append(m)
    return out


def test_submit_returns_at_once_and_the_queue_stays_bounded(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="ckptkit")
    repo = Repository(str(tmp_path / "run"))
    chain = _chain(repo, 10)
    idx = CommitIndexer(_closed_port_url(), repo, max_queue=3)
    start = time.perf_counter()
    for m in chain:
        idx.submit(m)
    assert time.perf_counter() - start < 0.05
    assert idx.pending <= 3 and idx.dropped >= 7
    assert len(_messages(caplog, "dropping the oldest")) == 1
    assert not idx.flush(5), "flush waited on an outage"
    idx.close(timeout=5)
    assert idx.dropped == 10 and idx.pending == 0
    idx.submit(chain[-1])  # after close: left to sync, said so
    assert idx.dropped == 11 and _messages(caplog, "after the indexer closed")
    with pytest.raises(InvalidArgumentError, match="max_queue"):
        CommitIndexer(str(tmp_path / "c.db"), repo, max_queue=0)
    with pytest.raises(InvalidArgumentError, match="catalog URL"):
        CommitIndexer("mysql://db/catalog", repo)


def test_the_indexer_checks_ids_and_parents_as_add_does(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ckptkit")
    db = str(tmp_path / "c.db")
    repo = Repository(str(tmp_path / "run"))
    a, b, c = _chain(repo, 3)
    idx = CommitIndexer(db, repo)
    idx.submit(b)  # its parent is not in the catalog: the repository is indexed, which verifies the chain
    idx.submit(c.model_copy(update={"name": "forged"}))  # bytes that do not hash to its id
    assert idx.flush(30)
    idx.close()
    assert (idx.indexed, idx.rejected) == (1, 1) and _messages(caplog, "forged of")
    with Catalog(db) as cat:
        assert sorted(r.name for r in cat.ls()) == ["step-1", "step-2", "step-3"]
        assert [r.name for r in cat.descendants(a.id)] == ["step-2", "step-3"]
        assert cat.sync(hash_tensors=False)[0].indexed == []


# --- the benchmark ----------------------------------------------------------------------------------------


def test_bench_catalog_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "catalog.py"), "--manifests", "120", "--repos", "12", "--runs", "1",
           "--no-postgres", "--json", "--dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
    for key in ("catalog_index_per_s", "catalog_query_ms", "catalog_sync_noop_s"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (key, result)
    assert set(result["targets"]) == {"catalog_index_per_s", "catalog_query_ms"} == set(result["pass"])
    assert result["postgresql"] == "n/a" and result["postgresql_why"] == "--no-postgres"
    assert result["queries"]["descendants_wide"]["results"] > result["queries"]["descendants"]["results"] > 0
