"""Lineage audit: a history with resume, continue and transfer edges across repositories; DAG outputs parsed
and checked; tampering with an ancestor detected; copy keeps history; the CLI in-process and as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit import CheckpointManager, Retention
from ckptkit.cli import main
from ckptkit.history.chain import verify_chain
from ckptkit.history.copy import copy
from ckptkit.history.diff import diff
from ckptkit.history.graph import history
from ckptkit.history.render import render
from ckptkit.schema import DataSegment
from ckptkit.training import PlannedLR

sys.path.insert(0, str(Path(__file__).parent))
from screenshots import blobs, screenshot


def _mlp(out: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, out))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: PlannedLR | None, steps: int) -> float:
    loss = torch.zeros(())
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
    return loss.item()


def build_history(tmp: Path) -> tuple[str, str]:
    """pretrain (init, train) -> killed -> resume -> continue on new data -> transfer into a classifier."""
    base, fine = str(tmp / "base"), str(tmp / "fine")
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = PlannedLR(opt, total_steps=6, warmup_steps=1)
    state = {"model": model, "optimizer": opt, "scheduler": sched}
    mgr = CheckpointManager(base, state, retention=Retention(keep_last=2),
                            data=DataSegment(name="part-1", fingerprint="f1", size=100), hparams={"lr": 1e-2})  # fmt: skip
    for step in (1, 2, 3):
        mgr.save(step, samples_seen=16 * step, metrics={"loss": _train(model, opt, sched, 1)})
    # a new process resumes the run
    mgr = CheckpointManager(base, state, retention=Retention(keep_last=2))
    mgr.restore()
    for step in (4, 5, 6):
        mgr.save(step, samples_seen=16 * step, metrics={"loss": _train(model, opt, sched, 1)})
    # continue on new data with a changed LR plan
    mgr = CheckpointManager(base, state, retention=Retention(keep_last=2), hparams={"lr": 1e-2})
    mgr.continue_from(schedule="restart", total_steps=9, warmup_steps=1,
                      new_data=DataSegment(name="part-2", fingerprint="f2", size=50))  # fmt: skip
    for step in (7, 8, 9):
        mgr.save(step, samples_seen=96 + 16 * (step - 6), metrics={"loss": _train(model, opt, sched, 1)})
    # transfer into another repository, as a 3-class classifier
    clf = _mlp(out=3, seed=1)
    copt = torch.optim.AdamW(clf.parameters())
    cmgr = CheckpointManager(fine, {"model": clf, "optimizer": copt})
    cmgr.transfer_from(base)
    for step in (1, 2):
        cmgr.save(step, metrics={"acc": 0.5 + step / 10, "loss": _train(clf, copt, None, 1)})
    return base, fine


@pytest.fixture(scope="module")
def hist(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return build_history(tmp_path_factory.mktemp("lineage"))


def test_history_has_every_edge_across_repositories(hist: tuple[str, str]) -> None:
    base, fine = hist
    h = history(fine)
    names = [n.manifest.name for n in h.nodes]
    assert names == ["step-00000002", "step-00000001"] + [f"step-{s:08d}" for s in range(9, 0, -1)]
    relations = {(h.node(c).manifest.name, h.node(p).manifest.name, r)  # type: ignore[union-attr]
                 for c, p, r in h.edges}  # fmt: skip
    assert ("step-00000004", "step-00000003", "resume") in relations
    assert ("step-00000007", "step-00000006", "continue") in relations
    assert ("step-00000001", "step-00000009", "transfer") in relations
    assert not h.missing
    archived = {n.manifest.name for n in h.nodes if n.archived}
    assert archived >= {"step-00000001", "step-00000005"} - {"step-00000001"}  # pruned by retention, still there
    head = h.nodes[0].manifest
    assert [d.name for d in ckptkit.inspect(base).data] == ["part-1", "part-2"]
    assert head.lineage.relation == "train"


def test_dag_outputs_parse_to_the_same_graph(hist: tuple[str, str]) -> None:
    _, fine = hist
    h = history(fine)
    data = json.loads(render(h, "json"))
    assert len(data["nodes"]) == 11 and len(data["edges"]) == 10
    assert {e["relation"] for e in data["edges"]} == {"train", "resume", "continue", "transfer"}
    ids = {n["id"] for n in data["nodes"]}
    assert all(e["child"] in ids and e["parent"] in ids for e in data["edges"])
    mermaid = render(h, "mermaid").splitlines()
    assert mermaid[0] == "graph BT"
    arrows = [re.match(r"\s+n(\w{12}) -->\|(\w+)\| n(\w{12})$", line) for line in mermaid[1:] if "-->" in line]
    assert len(arrows) == 10 and all(arrows)
    assert {(a.group(1), a.group(3), a.group(2)) for a in arrows if a} == {
        (e["child"][:12], e["parent"][:12], e["relation"]) for e in data["edges"]}  # fmt: skip
    dot = render(h, "dot")
    assert dot.startswith("digraph lineage {") and dot.count(" -> ") == 10
    text = render(h, "text")
    assert text.splitlines()[0].startswith("step-00000002") and "[transfer]" in text and "[continue]" in text


IN_CI = os.environ.get("CI") == "true"  # in CI a missing tool is a failure, never a skip


@pytest.mark.skipif(shutil.which("dot") is None and not IN_CI, reason="Graphviz not installed (.ci/run installs it)")
def test_svg_and_png_rendered_with_graphviz(hist: tuple[str, str], tmp_path: Path) -> None:
    _, fine = hist
    runner = CliRunner()
    out = runner.invoke(main, ["lineage", fine, "--format", "svg"])
    assert out.exit_code == 0 and "<svg" in out.output and "transfer" in out.output
    png = tmp_path / "g.png"
    out = runner.invoke(main, ["lineage", fine, "--format", "png", "-O", str(png)])
    assert out.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_graphviz_is_a_clear_message(hist: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    out = CliRunner().invoke(main, ["lineage", hist[1], "--format", "svg"])
    assert out.exit_code == 1 and "apt-get install graphviz" in out.output


def _copy_history(hist: tuple[str, str], tmp: Path) -> tuple[str, str]:
    base, fine = str(tmp / "base"), str(tmp / "fine")
    shutil.copytree(hist[0], base)
    shutil.copytree(hist[1], fine)
    # the fine-tuned repository names the base by URL: point it at the copy by rewriting nothing (ids must
    # hold), so the copied fine-tune must be read with the original base still in place
    return base, fine


def test_chain_verifies_and_tampering_with_an_ancestor_is_detected(hist: tuple[str, str], tmp_path: Path) -> None:
    base, fine = hist
    assert verify_chain(fine).ok
    work = tmp_path / "base"
    shutil.copytree(base, work)
    # 1. edit an ancestor manifest (a committed one) without fixing its id
    victim = work / "checkpoints" / "step-00000008.json"
    victim.write_text(victim.read_text().replace('"lr":0.01', '"lr":0.5'))
    rep = verify_chain(str(work), "step-00000009")
    assert not rep.ok and any("step-00000008" in p for ps in rep.problems.values() for p in ps)
    # 2. a consistent forgery (id recomputed) breaks the child's hash link instead
    from ckptkit.schema import manifest_id

    data = json.loads(victim.read_text())
    data["id"] = manifest_id({k: v for k, v in data.items() if k != "id"})
    victim.write_text(json.dumps(data, separators=(",", ":")))
    rep = verify_chain(str(work), "step-00000009")
    assert not rep.ok and any("ancestor cannot be verified" in p for ps in rep.problems.values() for p in ps)
    # 3. swap an object of an ancestor for another object's bytes
    shutil.rmtree(work)
    shutil.copytree(base, work)
    m8 = ckptkit.inspect(str(work), "step-00000008")
    objs = sorted(m8.objects)
    a, b = (work / "objects" / h[:2] / h for h in objs[:2])
    a.write_bytes(b.read_bytes())
    rep = verify_chain(str(work), "step-00000009")
    assert not rep.ok and any(objs[0] in p for ps in rep.problems.values() for p in ps)
    out = subprocess.run([sys.executable, "-m", "ckptkit.cli", "verify", "--chain", str(work), "step-00000009"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and objs[0] in out.stdout


def test_diff_reports_tensors_and_manifest(hist: tuple[str, str]) -> None:
    base, fine = hist
    d = diff(base, "step-00000008", base, "step-00000009")
    assert d.counts() == {"changed": 4}
    assert all(t.rel_l2 is not None and t.rel_l2 > 0 for t in d.tensors.values())
    assert "loss" in d.metrics
    x = diff(base, "step-00000009", fine, "step-00000001")
    assert x.tensors["2.weight"].status == "reshaped" and x.tensors["0.weight"].status == "changed"
    out = CliRunner().invoke(main, ["diff", f"{base}@step-00000009", f"{fine}@step-00000001"])
    assert out.exit_code == 0 and "reshaped" in out.output and "[1, 16]" in out.output


def test_copy_sends_only_missing_objects_and_keeps_history(hist: tuple[str, str], tmp_path: Path) -> None:
    base, _ = hist
    dst = str(tmp_path / "dst")
    first = copy(base, dst, ["step-00000008"])
    assert first.checkpoints == ["step-00000008"] and first.objects_copied > 0
    second = copy(base, dst)
    objs = {n: set(ckptkit.inspect(base, n).objects) for n in ckptkit.storage.Repository(base).list()}
    others = set().union(*(o for n, o in objs.items() if n != "step-00000008"))
    assert second.skipped == ["step-00000008"]
    assert second.objects_copied == len(others - objs["step-00000008"])  # only what dst lacks is sent
    assert second.objects_present == len(objs["step-00000008"])
    assert verify_chain(dst, "step-00000009").ok  # ancestors archived: the chain is whole in dst
    assert [n.manifest.name for n in history(dst, "step-00000009").nodes][-1] == "step-00000001"
    out = subprocess.run([sys.executable, "-m", "ckptkit.cli", "copy", base, str(tmp_path / "dst2")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "copied 3 checkpoint(s)" in out.stdout


def test_log_and_audit_commands(hist: tuple[str, str], tmp_path: Path) -> None:
    _, fine = hist
    runner = CliRunner()
    out = runner.invoke(main, ["log", fine])
    assert out.exit_code == 0, out.output
    blocks = out.output.split("checkpoint step-")
    assert len(blocks) == 12 and "relation: transfer" in out.output and "relation: continue" in out.output
    assert "part-2 (" in out.output and '"plan": {' in out.output
    html_file = tmp_path / "audit.html"
    out = runner.invoke(main, ["audit", fine, "--html", str(html_file)])
    assert out.exit_code == 0, out.output
    assert "integrity: OK" in out.output and "part-1" in out.output
    page = html_file.read_text()
    assert "<svg" in page and "polyline" in page and "transfer from step-00000009" in page


def _folded_history(tmp: Path) -> str:
    """init, 6 plain train checkpoints (5 of them fold into one node), continue on new data, 1 more; then a
    transfer into another repository and one train checkpoint there. Returns the fine-tune's repository."""
    base, fine = str(tmp / "base"), str(tmp / "fine")
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    mgr = CheckpointManager(base, state, data=DataSegment(name="part-1", fingerprint="f1", size=100))
    for step in range(1, 8):
        mgr.save(step, samples_seen=16 * step, metrics={"loss": _train(model, opt, None, 1)})
    mgr = CheckpointManager(base, state)
    mgr.continue_from(new_data=DataSegment(name="part-2", fingerprint="f2", size=50))
    for step in (8, 9):
        mgr.save(step, samples_seen=16 * step, metrics={"loss": _train(model, opt, None, 1)})
    clf = _mlp(out=3, seed=1)
    cmgr = CheckpointManager(fine, {"model": clf})
    cmgr.transfer_from(base)
    cmgr.save(1, metrics={"loss": 1.0})
    cmgr.save(2, metrics={"loss": 0.5})
    return fine


@pytest.mark.skipif(shutil.which("chromium") is None and not IN_CI, reason="Chromium not installed (.ci/run installs it)")
@pytest.mark.skipif(shutil.which("dot") is None and not IN_CI, reason="Graphviz not installed (.ci/run installs it)")
def test_audit_page_in_headless_chromium_draws_the_lineage_and_folds_plain_training(tmp_path: Path) -> None:
    """The page a reviewer opens: its screenshot shows each lineage node (coloured by relation) and one integrity
    badge per history row; five plain train checkpoints are one node and one folded row; metrics are plotted
    against labelled global-step axes; each training segment lists its data."""
    from ckptkit.history.page import RELATION_COLORS

    fine = _folded_history(tmp_path)
    html_file, shot = tmp_path / "audit.html", tmp_path / "audit.png"
    assert CliRunner().invoke(main, ["audit", fine, "--html", str(html_file)]).exit_code == 0
    page = html_file.read_text()
    assert "5 train checkpoints, steps 2..6" in page and "global step" in page and ">loss</text>" in page
    assert "part-1: 112 samples" in page and "part-2: 32 samples" in page  # data per training segment
    img = screenshot(html_file, shot, tmp_path / "profile")
    # legend (1 each) + graph node + the history row's relation badge: transfer, continue and init appear once
    # each in the graph and the table; the folded run is one graph node and no table badge
    for relation in ("transfer", "continue", "init"):
        assert blobs(img, RELATION_COLORS[relation]) == 3, relation
    assert blobs(img, RELATION_COLORS["folded"]) == 2
    # one integrity badge per history row shown: fine 2, 1; base 9, 8 (continue), 7, 1 (init); the run folded
    assert blobs(img, "#d1fadf") + blobs(img, "#e0e7ff") == 6


@pytest.mark.skipif(shutil.which("chromium") is None and not IN_CI, reason="Chromium not installed (.ci/run installs it)")
def test_audit_html_renders_in_headless_chromium(hist: tuple[str, str], tmp_path: Path) -> None:
    html_file, shot = tmp_path / "audit.html", tmp_path / "audit.png"
    assert CliRunner().invoke(main, ["audit", hist[1], "--html", str(html_file)]).exit_code == 0
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           html_file.as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    img = Image.open(shot).convert("L")
    colors = img.getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 16  # text, tables and the plot: not a blank page
