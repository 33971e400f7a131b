"""The catalog over a real SQLite file and a real PostgreSQL server (tests/pgserver.py), one set of tests for both.

A small history is built once: a base run (init, train, resume, continue on new data) in one repository, a model
transferred from it into a second repository, and a model imported from the base's exported weights into a third.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from sqlalchemy import create_engine, func, select, text

import ckptkit
from ckptkit.catalog import SCHEMA_REVISION, Catalog
from ckptkit.catalog import tables as t
from ckptkit.catalog.database import REVISIONS, resolve_url
from ckptkit.errors import InvalidArgumentError
from ckptkit.schema import DataSegment, Manifest

sys.path.insert(0, str(Path(__file__).parent))
from cli_driver import run_cli

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["sqlite", "postgresql"]


def _load_pgserver() -> ModuleType:
    name = "ckptkit_tests_pgserver"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("pgserver.py"))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def pg() -> Iterator[object]:
    pgserver = _load_pgserver()
    try:
        server = pgserver.PgServer.start()
    except pgserver.PgUnavailable as err:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"PostgreSQL is needed in CI: {err}")
        pytest.skip(f"PostgreSQL not available: {err}")
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "catalog.db")
    server = request.getfixturevalue("pg")
    return str(server.create_database())  # type: ignore[attr-defined]


@pytest.fixture
def cat(catalog_url: str) -> Iterator[Catalog]:
    with Catalog(catalog_url) as c:
        yield c


@dataclass
class World:
    base: str
    fine: str
    imp: str
    export: str  # base's last checkpoint exported as model.safetensors
    export_fine: str
    m: dict[str, Manifest]  # "base/step-00000001" -> manifest
    between: str  # an ISO time after base's step 3, before step 4


def _bump(model: torch.nn.Module, by: float = 0.01) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("catalog-world")
    base, fine, imp = str(tmp / "base"), str(tmp / "fine"), str(tmp / "imp")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optimizer": opt}
    mgr = ckptkit.CheckpointManager(base, state, data=DataSegment(name="part-1", fingerprint="f1", size=10),
                                    hparams={"lr": 0.1})  # fmt: skip
    for s in (1, 2, 3):
        _bump(model)
        mgr.save(s, samples_seen=4 * s, metrics={"loss": 1.0 / s})
    mgr.close()
    time.sleep(0.01)
    between = ckptkit.inspect(base).created_at.isoformat()
    time.sleep(0.01)
    mgr = ckptkit.CheckpointManager(base, state, hparams={"lr": 0.1})  # a new process resumes
    mgr.restore()
    _bump(model)
    mgr.save(4, samples_seen=16, metrics={"loss": 0.3})
    mgr.close()
    mgr = ckptkit.CheckpointManager(base, state, hparams={"lr": 0.05})  # continue on new data, lower LR
    mgr.continue_from(new_data=DataSegment(name="part-2", fingerprint="f2", size=5), lr=0.05)
    for s in (5, 6):
        _bump(model)
        mgr.save(s, samples_seen=16 + 4 * (s - 4), metrics={"loss": 0.1 * (7 - s), "acc": 0.1 * s})
    mgr.close()
    torch.manual_seed(1)
    clf = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 3))
    cm = ckptkit.CheckpointManager(fine, {"model": clf}, data=DataSegment(name="part-3", fingerprint="f3"))
    cm.transfer_from(base, key_map={"0.{}": "{}"})  # a parent in another repository
    for s in (1, 2):
        _bump(clf[1], 0.5)
        cm.save(s, metrics={"loss": 0.05 * s})
    cm.close()
    export = str(tmp / "export-base")
    ckptkit.export(base, export)
    export_fine = str(tmp / "export-fine")
    ckptkit.export(fine, export_fine)
    im = ckptkit.CheckpointManager(imp, {"model": torch.nn.Linear(4, 2)})
    im.start_from_files(os.path.join(export, "model.safetensors"))  # relation import: no parent, same weights
    im.save(1)
    im.close()
    m = {f"{Path(u).name}/{x.name}": x for u in (base, fine, imp) for x in ckptkit.checkpoints(u)}
    return World(base, fine, imp, export, export_fine, m, between)


def _names(recs: list) -> list[str]:  # type: ignore[type-arg]
    return [f"{Path(r.repo).name}/{r.name}" for r in recs]


def _steps(repo: str, *steps: int) -> list[str]:
    return [f"{repo}/step-{s:08d}" for s in steps]


# --- indexing and queries ---------------------------------------------------------------------------------


def test_every_query_gives_its_exact_answer(cat: Catalog, world: World) -> None:
    # the fine-tune first: its transfer parent lives in a repository the catalog does not hold yet; it is
    # verified there (read once), and linked by id once that repository is added
    fine = cat.add(world.fine)
    assert fine.ok and sorted(fine.indexed) == ["step-00000001", "step-00000002"]
    assert fine.read == 3  # its two manifests and the parent in base
    base = cat.add(world.base)
    assert base.ok and base.read == 6 and len(base.indexed) == 6
    assert cat.add(world.imp).ok
    assert cat.repositories() == [world.fine, world.base, world.imp]
    assert base.status == {"committed": 6}

    # which checkpoints' weights saw part-1: all of base (inherited by resume and continue), and the
    # fine-tune through its transfer edge (1 edge) and its next save (2 edges); not the import (no parent)
    saw = cat.where_data("part-1")
    assert _names(saw) == _steps("base", 1, 2, 3, 4, 5, 6) + _steps("fine", 1, 2)
    assert [r.depth for r in saw] == [0] * 6 + [1, 2]
    assert saw[4].data == ["part-1", "part-2"]
    assert _names(cat.where_data("f2")) == _steps("base", 5, 6) + _steps("fine", 1, 2)  # by fingerprint
    assert _names(cat.where_data("part-3")) == _steps("fine", 1, 2)
    assert cat.where_data("never-seen") == []

    step3 = world.m["base/step-00000003"].id
    desc = cat.descendants(step3)
    assert _names(desc) == _steps("base", 4, 5, 6) + _steps("fine", 1, 2)
    assert [r.depth for r in desc] == [1, 2, 3, 4, 5]
    assert [r.relation for r in desc] == ["resume", "continue", "train", "transfer", "train"]
    anc = cat.ancestors(world.m["fine/step-00000002"].id[:10])  # a unique prefix is enough
    assert _names(anc) == _steps("fine", 1) + _steps("base", 6, 5, 4, 3, 2, 1)
    assert cat.ancestors(world.m["base/step-00000001"].id) == []
    assert cat.get(step3[:8]).name == "step-00000003"

    # base's latest, exported: the import holds the very same weights; the fine-tune's first layer holds them
    # (transferred, unchanged), among the weights of its new head
    found = cat.find(world.export)
    assert [(f"{Path(f.checkpoint.repo).name}/{f.checkpoint.name}", f.component, f.exact, f.matched, f.tensors)
            for f in found] == [("base/step-00000006", "model", True, 2, 2), ("imp/step-00000001", "model", True, 2, 2),
                                ("fine/step-00000001", "model", False, 2, 4),
                                ("fine/step-00000002", "model", False, 2, 4)]  # fmt: skip
    assert [_names([f.checkpoint]) for f in cat.find(world.export_fine)] == [_steps("fine", 2)]
    part = Path(world.export).parent / "bias-only.safetensors"  # part of the weights: a match, not exact
    from safetensors.torch import load_file, save_file

    save_file({"b": load_file(os.path.join(world.export, "model.safetensors"))["bias"]}, str(part))
    assert [(_names([f.checkpoint])[0], f.exact, f.matched, f.tensors) for f in cat.find(part)] == [
        ("base/step-00000006", False, 1, 2), ("fine/step-00000001", False, 1, 4), ("fine/step-00000002", False, 1, 4),
        ("imp/step-00000001", False, 1, 2)]  # oldest first

    assert _names(cat.best("loss", "min")) == _steps("fine", 1)
    assert _names(cat.best("loss", "min", world.base, limit=2)) == _steps("base", 6, 5)
    assert _names(cat.best("acc", "max")) == _steps("base", 6)
    assert cat.best("acc", "max")[0].metrics == {"loss": pytest.approx(0.1), "acc": pytest.approx(0.6)}

    assert len(cat.ls()) == 9
    assert _names(cat.ls(world.fine)) == _steps("fine", 1, 2)
    assert _names(cat.ls(relation="continue")) == _steps("base", 5)
    assert _names(cat.ls(relation="import")) == _steps("imp", 1)
    assert _names(cat.ls(world.base, since=world.between)) == _steps("base", 3, 4, 5, 6)
    assert _names(cat.ls(hparams={"lr": 0.05})) == _steps("base", 5, 6)
    assert _names(cat.ls(world.base, hparams={"lr": 0.1}, relation="resume")) == _steps("base", 4)
    with pytest.raises(InvalidArgumentError, match="not in the catalog"):
        cat.ls("/nowhere")


def test_a_tampered_manifest_is_reported_and_not_indexed(cat: Catalog, world: World, tmp_path: Path) -> None:
    repo = tmp_path / "copy"
    shutil.copytree(world.base, repo)
    path = repo / "checkpoints" / "step-00000002.json"
    path.write_bytes(path.read_bytes().replace(b'"loss":0.5', b'"loss":0.05'))  # a better loss, by hand
    report = cat.add(str(repo))
    assert not report.ok
    assert report.indexed == ["step-00000001"]
    why = dict(report.rejected)
    assert "does not match its content" in why[str(path)]
    # its descendants' chain is broken: each is reported, none indexed
    assert "step-00000002" in why[str(repo / "checkpoints" / "step-00000003.json")]
    assert len(why) == 5
    assert _names(cat.ls()) == ["copy/step-00000001"]
    # a manifest deleted from the middle of the chain breaks it too
    other = tmp_path / "holes"
    shutil.copytree(world.base, other)
    (other / "checkpoints" / "step-00000005.json").unlink()
    report = cat.add(str(other))
    assert sorted(report.indexed) == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    assert "is not in" in dict(report.rejected)[str(other / "checkpoints" / "step-00000006.json")]


def test_sync_reads_only_the_new_manifests(cat: Catalog, tmp_path: Path) -> None:
    repo = str(tmp_path / "run")
    model = torch.nn.Linear(2, 2)
    mgr = ckptkit.CheckpointManager(repo, {"model": model})
    for s in (1, 2):
        _bump(model)
        mgr.save(s)
    assert cat.add(repo).read == 2
    for s in (3, 4):
        _bump(model)
        mgr.save(s)
    mgr.close()
    [report] = cat.sync()
    assert (report.read, sorted(report.indexed), report.objects_hashed) == (2, ["step-00000003", "step-00000004"], 2)
    [again] = cat.sync()
    assert (again.read, again.indexed, again.objects_hashed) == (0, [], 0)
    assert len(cat.ls(repo)) == 4


_SYNC = """
import sys, time
from ckptkit.catalog import Catalog
url, repo, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
cat = Catalog(url)
time.sleep(max(0.0, start - time.time()))
report = cat.add(repo)
assert report.ok, report.rejected
print(len(report.indexed))
"""


def test_two_processes_syncing_at_once_store_each_manifest_once(catalog_url: str, world: World) -> None:
    start = time.time() + 2.0  # both are past their imports by then, and begin together
    procs = [subprocess.Popen([sys.executable, "-c", _SYNC, catalog_url, repo, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for repo in (world.base, world.base)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    engine = create_engine(resolve_url(catalog_url))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.checkpoints)).scalar_one() == 6
        assert conn.execute(select(func.count()).select_from(t.locations)).scalar_one() == 6
        assert conn.execute(select(func.count()).select_from(t.repositories)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(t.parents)).scalar_one() == 5
        assert conn.execute(select(func.count()).select_from(t.object_tensors)).scalar_one() == 2 * 6
    engine.dispose()


def _rows(catalog_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows but the bookkeeping columns (times, database ids): what two indexings must agree on."""
    engine = create_engine(resolve_url(catalog_url))
    skip = {"indexed_at", "seen_at", "added_at", "synced_at", "id", "repository_id"}
    out = {}
    with engine.connect() as conn:
        for table in (t.checkpoints, t.locations, t.parents, t.data_segments, t.metrics, t.hparams,
                      t.checkpoint_objects, t.component_tensors, t.object_tensors):  # fmt: skip
            cols = [c for c in table.c if c.name not in skip or (table is t.checkpoints and c.name == "id")]
            out[table.name] = sorted(tuple(r) for r in conn.execute(select(*cols)))
        urls = {i: u for i, u in conn.execute(select(t.repositories.c.id, t.repositories.c.url))}
        out["locations_repo"] = sorted((urls[r], c, s) for r, c, s in conn.execute(
            select(t.locations.c.repository_id, t.locations.c.checkpoint_id, t.locations.c.status)))  # fmt: skip
    engine.dispose()
    return out


def test_many_repositories_in_worker_processes_index_as_one_by_one(catalog_url: str, world: World,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    copies = []
    for k in range(3):  # the same checkpoints under other names: each location is its own row
        shutil.copytree(world.base, tmp_path / f"base-{k}")
        copies.append(str(tmp_path / f"base-{k}"))
    tampered = tmp_path / "tampered"
    shutil.copytree(world.fine, tampered)
    path = tampered / "checkpoints" / "step-00000002.json"
    path.write_bytes(path.read_bytes().replace(b'"loss":0.1', b'"loss":0.01'))
    missing = str(tmp_path / "no-such-repo")
    urls = [world.fine, *copies, str(tampered), missing, world.base, world.imp]
    serial = str(tmp_path / "serial.db")
    with Catalog(serial) as one:
        expected = [one.add(u) if u != missing else None for u in urls]
    with Catalog(catalog_url) as cat:
        reports = cat.add_all(urls, workers=2)
        assert [r.repo for r in reports] == [str(Path(u).resolve()) for u in urls]  # in the order asked
        for got, want in zip(reports, expected, strict=True):
            if want is None:  # reported, not fatal to the others
                [(where, why)] = got.rejected
                assert where == missing and "cannot read the repository" in why
                continue
            assert (sorted(got.indexed), got.status, got.ok) == (sorted(want.indexed), want.status, want.ok)
        assert "does not match its content" in dict(reports[4].rejected)[str(path)]
        assert _rows(catalog_url) == _rows(serial)
        again = cat.sync(workers=2)
        assert len(again) == len(urls) - 1 and all(r.read == 0 and not r.indexed for r in again[:3])
        with pytest.raises(InvalidArgumentError, match="workers=0"):
            cat.add_all(urls, workers=0)
        with pytest.raises(InvalidArgumentError, match="storage_options must be JSON"):
            cat.add_all(urls, {"key": object()}, workers=2)
    res = run_cli([["catalog", "add", *copies, "--workers", "2", "--json"]], env={"CKPTKIT_CATALOG": catalog_url},
                  timeout=120)[0]  # fmt: skip
    assert res["rc"] == 0, res["err"]
    assert [r["read"] for r in json.loads(res["out"])] == [0, 0, 0]


def test_pruned_and_damaged_checkpoints_are_marked_not_forgotten(cat: Catalog, tmp_path: Path) -> None:
    repo = str(tmp_path / "run")
    model = torch.nn.Linear(2, 2)
    state = {"model": model}
    mgr = ckptkit.CheckpointManager(repo, state, data=DataSegment(name="d", fingerprint="fd"))
    for s in (1, 2, 3, 4):
        _bump(model)
        mgr.save(s, metrics={"loss": 1.0 / s})
    mgr.close()
    cat.add(repo)
    first = cat.ls(repo)[0]
    mgr = ckptkit.CheckpointManager(repo, state, retention=ckptkit.Retention(keep_last=2))
    assert sorted(mgr.prune()) == ["step-00000001", "step-00000002"]  # archived under lineage/, objects collected
    mgr.close()
    victim = next(iter(ckptkit.inspect(repo, "step-00000003").objects))
    os.remove(os.path.join(repo, "objects", victim[:2], victim))  # an object deleted outside ckptkit
    [report] = cat.sync()
    assert report.read == 0  # archived manifests the catalog holds are not read again
    assert report.status == {"archived": 2, "committed": 1, "incomplete": 1}
    recs = cat.ls(repo)
    assert [(r.name, r.status) for r in recs] == [("step-00000001", "archived"), ("step-00000002", "archived"),
                                                 ("step-00000003", "incomplete"), ("step-00000004", "committed")]
    assert recs[0].locations[0].objects_missing == 1 and recs[2].locations[0].objects_missing == 1
    assert recs[0].id == first.id
    assert len(cat.where_data("fd")) == 4 and len(cat.ancestors(recs[3].id)) == 3  # history kept
    assert _names(cat.best("loss", "min")) == ["run/step-00000004"]  # a restorable one
    assert _names(cat.best("loss", "max")) == ["run/step-00000004"]  # 1 and 2 are archived, 3 incomplete
    assert _names(cat.best("loss", "max", include_archived=True)) == ["run/step-00000001"]
    # a catalog that first sees the pruned repository indexes the archived manifests from lineage/
    with Catalog(str(tmp_path / "fresh.db")) as fresh:
        again = fresh.add(repo)
        assert again.ok and sorted(again.indexed) == sorted([f"lineage/{recs[0].id}", f"lineage/{recs[1].id}",
                                                             "step-00000003", "step-00000004"])
        assert again.status == {"archived": 2, "committed": 1, "incomplete": 1}
    # the checkpoint deleted outright stays in the catalog as removed
    ckptkit.storage.Repository(repo).delete("step-00000004")
    cat.sync()
    assert [r.status for r in cat.ls(repo)] == ["archived", "archived", "incomplete", "removed"]


def test_a_catalog_newer_than_ckptkit_is_refused(catalog_url: str) -> None:
    Catalog(catalog_url).close()
    engine = create_engine(resolve_url(catalog_url))
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {t.VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(InvalidArgumentError, match=r"schema revision 9999, newer .* upgrade ckptkit"):
        Catalog(catalog_url)


def test_the_migrations_end_at_the_schema_the_code_writes() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "ckptkit" / "catalog" / "_migrations"))
    script = ScriptDirectory.from_config(cfg)
    assert script.get_heads() == [SCHEMA_REVISION]
    assert [r.revision for r in script.walk_revisions()][::-1] == list(REVISIONS)


# --- command line ------------------------------------------------------------------------------------------


def _cli(catalog_url: str, *commands: list[str]) -> list[dict[str, Any]]:
    """Run ``ckptkit catalog ...`` command lines through the CLI's entry point, in one fresh process (one
    interpreter start for all of them: CI's time budget)."""
    return run_cli([["catalog", *c] for c in commands], env={"CKPTKIT_CATALOG": catalog_url}, timeout=120)


def _repo_names(res: dict[str, Any]) -> list[str]:
    assert res["rc"] == 0, res["err"]
    return [f"{Path(r['repo']).name}/{r['name']}" for r in json.loads(res["out"])]


def test_the_cli_verbs_answer_in_json(catalog_url: str, world: World) -> None:
    step3 = world.m["base/step-00000003"].id
    res = _cli(catalog_url,
               ["add", world.base, "--json"],
               ["add", world.fine],
               ["sync", "--json"],
               ["where", "--data", "part-2", "--json"],
               ["descendants", step3[:12], "--json"],
               ["ancestors", world.m["base/step-00000002"].id, "--json"],
               ["find", world.export, "--json"],
               ["best", "--metric", "acc", "--max", "--json"],
               ["best", "--metric", "loss", "--min", "--repo", world.base, "--json"],
               ["ls", "--repo", world.base, "--relation", "train", "--json"],
               ["ls", "--hparam", "lr=0.05", "--since", world.between, "--json"],
               ["--catalog", catalog_url, "ls"],
               ["descendants", "zz"])  # fmt: skip
    assert res[0]["rc"] == 0, res[0]["err"]
    assert json.loads(res[0]["out"])[0]["read"] == 6
    assert res[1]["rc"] == 0 and "indexed 2" in res[1]["out"]
    assert [r["read"] for r in json.loads(res[2]["out"])] == [0, 0]
    assert _repo_names(res[3]) == _steps("base", 5, 6) + _steps("fine", 1, 2)
    assert _repo_names(res[4]) == _steps("base", 4, 5, 6) + _steps("fine", 1, 2)
    assert _repo_names(res[5]) == _steps("base", 1)
    assert _repo_names(res[6]) == _steps("base", 6) + _steps("fine", 1, 2)
    assert [m["exact"] for m in json.loads(res[6]["out"])] == [True, False, False]
    assert _repo_names(res[7]) == _steps("base", 6)
    assert _repo_names(res[8]) == _steps("base", 6)
    assert _repo_names(res[9]) == _steps("base", 2, 3, 6)
    assert _repo_names(res[10]) == _steps("base", 5, 6)
    table = res[11]  # a rich table; --catalog on the group
    assert table["rc"] == 0 and "step-00000006" in table["out"] and "continue" in table["out"]
    assert res[12]["rc"] == 2 and res[12]["err"].startswith("error: 'zz' is not a checkpoint id")


def test_catalog_ls_does_not_import_torch(catalog_url: str, world: World) -> None:
    with Catalog(catalog_url) as c:
        c.add(world.fine)
    code = ("import json, sys\nfrom ckptkit.cli import run\nsys.argv = ['ckptkit'] + sys.argv[1:]\ntry:\n    run()\n"
            "finally:\n    print(json.dumps(sorted({'torch', 'numpy', 'safetensors'} & set(sys.modules))), "
            "file=sys.stderr)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, "catalog", "--catalog", catalog_url, "ls", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1]) == []
    assert len(json.loads(out.stdout)) == 2


def test_the_default_catalog_is_a_file_in_the_user_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTKIT_CATALOG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert resolve_url(None) == f"sqlite:///{tmp_path / 'data' / 'ckptkit' / 'catalog.db'}"
    with Catalog() as c:
        assert c.repositories() == []
    assert (tmp_path / "data" / "ckptkit" / "catalog.db").is_file()
    monkeypatch.setenv("CKPTKIT_CATALOG", "postgres://u@db/cat")
    assert resolve_url(None) == "postgresql+psycopg://u@db/cat"
    with pytest.raises(InvalidArgumentError, match="use a file path, sqlite"):
        resolve_url("mysql://x/y")
