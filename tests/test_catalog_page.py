"""``ckptkit catalog html``: a catalog query's result as one HTML page, drawn the way the audit page is.

Two real repositories are built with ckptkit: a base run (init, six plain train checkpoints, killed and resumed,
continued on new data) and a classifier transferred from it into a second repository. One checkpoint's objects
are deleted, one manifest is deleted and one checkpoint is pruned by retention, so the catalog holds each status.
The command runs in a subprocess as a user runs it, and the page is opened in headless Chromium: the screenshot
is checked for each lineage node by its relation colour and for one integrity badge per table row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.catalog import Catalog, CheckpointRecord, Location
from ckptkit.history.catalog_page import lineage_dot, page
from ckptkit.history.page import BADGE_COLORS, RELATION_COLORS
from ckptkit.schema import DataSegment

sys.path.insert(0, str(Path(__file__).parent))
from cli_driver import run_cli
from screenshots import blobs, screenshot

IN_CI = os.environ.get("CI") == "true"  # in CI a missing tool is a failure, never a skip
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None and not IN_CI,
                                    reason="Chromium not installed (.ci/run installs it)")  # fmt: skip
needs_dot = pytest.mark.skipif(shutil.which("dot") is None and not IN_CI,
                               reason="Graphviz not installed (.ci/run installs it)")  # fmt: skip
HOSTILE = '<script>alert("data")</script>'


@dataclass
class World:
    base: str
    fine: str
    catalog: str
    ids: dict[str, str]  # "base/step-00000001" -> id


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.item())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("catalog-page")
    base, fine = str(tmp / "base"), str(tmp / "fine")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optimizer": opt}
    mgr = ckptkit.CheckpointManager(base, state, data=DataSegment(name="part-1", fingerprint="f1", size=10))
    for s in range(1, 8):  # init, then 6 plain train checkpoints: 2..6 fold into one node
        mgr.save(s, samples_seen=8 * s, metrics={"loss": _train(model, opt)})
    mgr.close()
    mgr = ckptkit.CheckpointManager(base, state)  # a new process resumes
    mgr.restore()
    for s in (8, 9):
        mgr.save(s, samples_seen=8 * s, metrics={"loss": _train(model, opt)})
    mgr.close()
    mgr = ckptkit.CheckpointManager(base, state)
    mgr.continue_from(new_data=DataSegment(name="part-2", fingerprint="f2", size=5))
    for s in (10, 11):
        mgr.save(s, samples_seen=8 * s, metrics={"loss": _train(model, opt)})
    mgr.close()
    torch.manual_seed(1)
    clf = torch.nn.Linear(4, 2)
    copt = torch.optim.SGD(clf.parameters(), lr=0.1)
    cm = ckptkit.CheckpointManager(fine, {"model": clf, "optimizer": copt}, retention=ckptkit.Retention(keep_last=2),
                                   data=DataSegment(name=HOSTILE, fingerprint="f3"))  # fmt: skip
    cm.transfer_from(base)
    for s in (1, 2, 3):  # step 1 is pruned by retention: archived
        cm.save(s, metrics={"loss": _train(clf, copt), "acc": 0.5 + s / 10})
    cm.close()
    catalog = str(tmp / "catalog.db")
    with Catalog(catalog) as cat:
        cat.add(base)
        cat.add(fine)
        ids = {f"{Path(r.repo).name}/{r.name}": r.id for r in cat.ls()}
        # an object only fine's step 3 lists, deleted outside ckptkit: incomplete
        only3 = set(ckptkit.inspect(fine, "step-00000003").objects) - set(ckptkit.inspect(fine, "step-00000002").objects)
        lost = sorted(only3)[0]
        os.remove(os.path.join(fine, "objects", lost[:2], lost))
        os.remove(os.path.join(base, "checkpoints", "step-00000009.json"))  # removed
        cat.sync()
        status = {f"{Path(r.repo).name}/{r.name}": r.status for r in cat.ls()}
    assert status["fine/step-00000003"] == "incomplete" and status["fine/step-00000001"] == "archived"
    assert status["base/step-00000009"] == "removed" and status["base/step-00000010"] == "committed"
    return World(base, fine, catalog, ids)


def _html(world: World, tmp: Path, *args: str) -> tuple[dict[str, object], str]:
    out = tmp / "page.html"
    res = run_cli([["catalog", "html", *args, "-o", str(out)]], env={"CKPTKIT_CATALOG": world.catalog})[0]
    return res, out.read_text() if out.exists() else ""


@needs_chromium
@needs_dot
def test_descendants_page_in_headless_chromium_draws_every_node_and_a_badge_per_row(world: World,
                                                                                    tmp_path: Path) -> None:  # fmt: skip
    """Descendants of the base's first checkpoint: both repositories, every relation, each status."""
    out = tmp_path / "descendants.html"
    code = ("import json, sys\nfrom ckptkit.cli import run\nsys.argv = ['ckptkit'] + sys.argv[1:]\ntry:\n    run()\n"
            "finally:\n    print(json.dumps(sorted({'torch', 'numpy', 'safetensors'} & set(sys.modules))), "
            "file=sys.stderr)")  # fmt: skip
    root = world.ids["base/step-00000001"]
    res = subprocess.run([sys.executable, "-c", code, "catalog", "--catalog", world.catalog, "html", "--descendants",
                          root[:10], "-o", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stderr.strip().splitlines()[-1]) == []  # the command imports no torch
    assert res.stdout.strip() == f"wrote {out}: 14 checkpoint(s) in 2 repositories"
    html = out.read_text()
    assert "<h1>Descendants of step-00000001 (" in html and "5 train checkpoints, steps 2..6" in html
    assert "&lt;script&gt;" in html and HOSTILE not in html
    shot = Path(os.environ.get("CKPTKIT_SCREENSHOT_DIR", tmp_path)) / "catalog-descendants.png"
    img = screenshot(out, shot, tmp_path / "profile")
    # the legend (1 each), the graph's node and the row's relation badge: init (step 1), resume (8), continue (10)
    # and transfer (fine's step 1) once each; the folded run is one node and one row without a relation badge;
    # nothing was imported (the legend alone)
    for relation in ("init", "resume", "continue", "transfer"):
        assert blobs(img, RELATION_COLORS[relation]) == 3, relation
    assert blobs(img, RELATION_COLORS["folded"]) == 2
    assert blobs(img, RELATION_COLORS["import"]) == 1
    # one integrity badge per row shown (the folded run's five rows are closed): fine 3 objects missing, fine 2,
    # fine 1 archived; base 11, 10, 9 removed, 8, 7, 1
    assert blobs(img, BADGE_COLORS["problems"]) == 1
    assert blobs(img, BADGE_COLORS["archived"]) == 1
    assert blobs(img, BADGE_COLORS["removed"]) == 1
    assert blobs(img, BADGE_COLORS["verified"]) == 6


@needs_chromium
@needs_dot
def test_where_data_page_draws_only_what_saw_the_data(world: World, tmp_path: Path) -> None:
    """Every checkpoint whose weights saw part-2: base's continue and its train child, then the transfer into
    fine and its train children (depth 1..3): no init or resume node, one transfer and one continue."""
    res, html = _html(world, tmp_path, "--data", "part-2")
    assert res["rc"] == 0, res["err"]
    assert "wrote" in str(res["out"]) and "5 checkpoint(s) in 2 repositories" in str(res["out"])
    assert "<h1>Checkpoints whose weights saw part-2</h1>" in html and "<th>depth</th>" in html
    img = screenshot(tmp_path / "page.html", tmp_path / "data.png", tmp_path / "profile")
    assert blobs(img, RELATION_COLORS["continue"]) == 3 and blobs(img, RELATION_COLORS["transfer"]) == 3
    assert blobs(img, RELATION_COLORS["init"]) == 1 and blobs(img, RELATION_COLORS["resume"]) == 1
    assert blobs(img, RELATION_COLORS["folded"]) == 1  # nothing to fold: the legend only
    assert blobs(img, BADGE_COLORS["verified"]) == 3 and blobs(img, BADGE_COLORS["archived"]) == 1
    assert blobs(img, BADGE_COLORS["problems"]) == 1


def test_bad_input_is_a_clear_error_and_writes_nothing(world: World, tmp_path: Path) -> None:
    out = str(tmp_path / "x.html")
    leaf = world.ids["fine/step-00000003"]
    res = run_cli([["catalog", "html", *args, "-o", out] for args in (
        ["--descendants", "ffff0000"], ["--data", "never-seen"], ["--descendants", leaf],
        [], ["--data", "part-1", "--repo", world.base], ["--repo", str(tmp_path / "unknown")],
        ["--ancestors", world.ids["base/step-00000001"]])], env={"CKPTKIT_CATALOG": world.catalog})  # fmt: skip
    assert res[0]["rc"] == 2 and res[0]["err"].startswith("error:") and "ffff0000" in res[0]["err"]
    assert res[1]["rc"] == 1 and "no indexed checkpoint saw a dataset named or fingerprinted 'never-seen'" in \
        res[1]["err"]  # fmt: skip
    assert res[2]["rc"] == 1 and "has no indexed descendants" in res[2]["err"]
    assert res[3]["rc"] == 2 and "give exactly one of --descendants" in res[3]["err"]
    assert res[4]["rc"] == 2 and "(got --data, --repo)" in res[4]["err"]
    assert res[5]["rc"] == 2 and "is not in the catalog" in res[5]["err"]
    assert res[6]["rc"] == 1 and "has no indexed ancestors" in res[6]["err"]
    assert not os.path.exists(out)


def test_repo_and_ancestors_pages(world: World, tmp_path: Path) -> None:
    res, html = _html(world, tmp_path, "--repo", world.fine)
    assert res["rc"] == 0, res["err"]
    assert "3 checkpoint(s) in 1 repository" in str(res["out"])
    assert f"transfer from {world.ids['base/step-00000011'][:12]} (not in this result)" in html
    assert "1 parent link(s) lead outside this result" in html
    res, html = _html(world, tmp_path, "--ancestors", world.ids["fine/step-00000002"])
    assert res["rc"] == 0, res["err"]
    assert "<h1>Ancestors of step-00000002 (" in html and "13 checkpoint(s) in 2 repositories" in str(res["out"])


# --- the page itself -----------------------------------------------------------------------------------------


def _rec(name: str, relation: str, step: int, parents: list[tuple[str, str]], repo: str = "/r/base",
         status: str = "committed", **kw: Any) -> CheckpointRecord:  # fmt: skip
    cid = f"{abs(hash((name, repo))):064x}"[-64:]
    return CheckpointRecord(id=cid, name=name, repo=repo, status=status, relation=relation,
                            created_at=datetime(2026, 1, 1, 0, 0, step, tzinfo=timezone.utc), epoch=0, global_step=step,
                            samples_seen=step, size=1, parents=parents, locations=(Location(repo, name, status),),
                            **kw)  # fmt: skip


def _chain(n: int, repo: str = "/r/base") -> list[CheckpointRecord]:
    recs = [_rec("s1", "init", 1, [], repo, metrics={"loss": 1.0}, data=["part-1"])]
    for s in range(2, n + 1):
        recs.append(_rec(f"s{s}", "train", s, [(recs[-1].id, "train")], repo, metrics={"loss": 1.0 / s},
                         data=["part-1"]))  # fmt: skip
    return recs


def test_hostile_names_render_as_text() -> None:
    evil = "<script>alert(1)</script>"
    recs = [_rec(evil, "init", 1, [], repo="/r/<img src=x onerror=alert(2)>", metrics={f"<b>{evil}": 0.5},
                 data=[f"{evil}&amp;"])]  # fmt: skip
    out = page(recs, f"title {evil}")
    assert "<script" not in out and "<img" not in out and "<b>" not in out
    assert out.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # title, heading, table, data, chart
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;amp;" in out  # an entity in a name stays text too
    if shutil.which("dot"):
        svg = out[out.index('<div class="graph">'):]
        assert "&lt;script&gt;" in svg[:svg.index("</svg>")]  # Graphviz escaped the node's label


def test_runs_of_plain_training_fold_and_axes_are_labelled() -> None:
    base = _chain(8)  # init, then 7 train: 2..7 are interior (8 is the head), so 6 fold
    fine = _rec("f1", "transfer", 1, [(base[-1].id, "transfer")], repo="/r/fine", metrics={"loss": 0.2})
    out = page([*base, fine], "q", root=base[0].id)
    assert out.count("6 train checkpoints, steps 2..7") == 2  # the graph's node and the table's folded row
    assert "(6 of 6 intact)</summary>" in out
    dot = lineage_dot([*base, fine], root=base[0].id)
    assert dot.count(" -> ") == 3  # fine -> s8 -> run -> s1
    assert re.search(r'"run-\w{12}" -> "' + base[0].id + r'" \[label="train"\]', dot)
    assert f'"{fine.id}" -> "{base[-1].id}" [label="transfer"]' in dot
    assert "penwidth=2.5" in dot and dot.count("subgraph cluster_") == 2
    assert ">global step</text>" in out and 'aria-label="loss against global step"' in out
    assert re.search(r">(solid|dashed): fine</text>", out) and re.search(r">(solid|dashed): base</text>", out)
    assert lineage_dot(base, fold=10).count(" -> ") == 7  # nothing folded


def test_parents_outside_the_result_and_statuses() -> None:
    recs = _chain(2)
    orphan = _rec("c1", "continue", 3, [("ab" * 32, "continue")], status="incomplete")
    gone = _rec("g1", "train", 4, [(orphan.id, "train")], status="removed")
    out = page([*recs, orphan, gone], "q")
    assert "1 parent link(s) lead outside this result" in out and "abababababab (not in this result)" in out
    assert "0 object(s) missing" in out and "removed from the repository" in out
    assert "2 committed, 1 incomplete, 1 removed" in out


def test_without_graphviz_the_lineage_is_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptkit.history.page as shared

    monkeypatch.setattr(shared.shutil, "which", lambda _: None)
    out = page(_chain(2), "q")
    assert "<svg" not in out.split("<h2>Checkpoints")[0]
    assert "<li>s2 (train, step 2) in /r/base</li><li>s1 (init, step 1) in /r/base</li>" in out
