"""Crash safety: a process saving a large state is SIGKILLed at random moments, over and over, in one repository.

Each trial starts ``tests/crash_worker.py`` (which continues from the latest checkpoint's step), lets it save for a
random, seeded time and kills it with SIGKILL. After every kill the repository must hold only complete
checkpoints, the latest one must restore bit-exactly to the state the worker saved at that step, and the
leftovers of the interrupted save (objects, temporary files, pending records) must never surface as a
checkpoint. At the end ``gc`` must remove every orphan without breaking a checkpoint.

Importing torch takes seconds, so the worker is a fork server: it imports once and forks a fresh saver process
per trial (see tests/forkserver.py and tests/crash_worker.py); the saver is what gets killed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit.api import checkpoints, gc
from ckptkit.storage import STALE_AFTER, Repository

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork are POSIX")

TRIALS = 20
SEED = 20240611
WORKER = Path(__file__).with_name("crash_worker.py")
sys.path.insert(0, str(Path(__file__).parent))
import crash_worker as worker  # noqa: E402
from forkserver import ForkServer  # noqa: E402


def _files(root: Path, sub: str, pattern: str) -> set[str]:
    d = root / sub
    return {str(p.relative_to(root)) for p in d.rglob(pattern)} if d.exists() else set()


def _pending(root: Path, *, temp_too: bool = False) -> dict[str, set[str]]:
    """Pending records (objects an in-flight save announced), by file name. With ``temp_too``, also the
    readable temporary files a saver killed while writing its record left behind: gc honours those too."""
    out: dict[str, set[str]] = {}
    d = root / "pending"
    for p in sorted(d.iterdir()) if d.exists() else []:
        if p.name.endswith(".json") or (temp_too and p.name.startswith(".tmp-")):
            try:
                out[p.name] = set(json.loads(p.read_bytes())["objects"])
            except (ValueError, KeyError, TypeError):
                assert p.name.startswith(".tmp-"), f"unreadable pending record {p}"
    return out


def _check_restores(url: str, name: str, step: int) -> None:
    """Restore ``name`` into a fresh model and optimizer; every tensor must equal what step ``step`` saved."""
    model = worker.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    res = ckptkit.restore(url, {"model": model, "optimizer": opt}, name, rng=False)
    assert res.manifest.name == name
    assert res.progress.global_step == step
    assert all(r.ok for r in res.reports.values()), res.reports
    exp = worker.expected_state(step, model)
    for pname, p in model.named_parameters():
        assert torch.equal(p.detach(), exp["param"][pname]), f"{name}: parameter {pname} differs from step {step}"
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], exp[key][pname]), f"{name}: optimizer {key} of {pname} differs"


def _check_repository(url: str, *, restore_all: bool) -> list[str]:
    """No partial checkpoint is visible: both listings agree, every listed checkpoint verifies (and restores)."""
    names = Repository(url).list()
    manifests = checkpoints(url)
    assert sorted(m.name for m in manifests) == sorted(names), "a listed manifest does not parse"
    for m in manifests:
        assert m.name == f"step-{m.progress.global_step:06d}"
    reports = ckptkit.verify(url)
    assert [r.name for r in reports] == names
    bad = [(r.name, r.problems) for r in reports if not r.ok]
    assert not bad, f"checkpoints failed verification after a crash: {bad}"
    for r in reports:
        assert r.objects > 0 and r.bytes > 96 << 20, r  # the whole state is referenced
    if manifests:
        latest = manifests[-1]
        assert latest.progress.global_step == max(m.progress.global_step for m in manifests)
        latest_by_default = ckptkit.inspect(url)
        assert latest_by_default.name == latest.name
        targets = manifests if restore_all else [latest]
        for m in targets:
            _check_restores(url, m.name, m.progress.global_step)
    return names


def _cli_verify(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptkit.cli", "verify", url], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def _referenced(url: str) -> set[str]:
    return {h for m in checkpoints(url) for h in m.objects}


@pytest.mark.timeout(300)
def test_sigkill_during_saves_never_exposes_a_partial_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    url = str(root)
    rng = random.Random(SEED)
    stats = {"mid_save": 0, "orphans_written": 0, "tmp_files": 0, "before_first_commit": 0, "after_commit": 0,
             "commits": 0}  # fmt: skip
    hits: list[int] = []
    server = ForkServer([sys.executable, str(WORKER), url], None, tmp_path / "worker.log")
    try:
        for trial in range(TRIALS):
            before_latest = max((m.progress.global_step for m in checkpoints(url)), default=0)
            pending_before = _pending(root)
            temps_before = _files(root, "objects", ".tmp-*")
            pid, start, lines = server.start()
            assert start == before_latest + 1, "the worker must continue from the latest committed step"
            # Mostly kill during later saves (a save takes ~0.2-0.5 s here), sometimes right at the start.
            delay = 0.0 if trial % 5 == 0 else rng.uniform(0.0, 0.3) if trial % 5 == 1 else rng.uniform(0.3, 2.0)
            time.sleep(delay)
            reported = server.kill(pid, lines)

            names = _check_repository(url, restore_all=False)
            steps = sorted(int(n.split("-")[1]) for n in names)
            latest = steps[-1] if steps else 0
            # A reported commit is durable: it (or a newer one) is in the repository.
            if reported:
                assert reported == list(range(start, start + len(reported)))
                assert latest >= reported[-1]
                assert f"step-{reported[-1]:06d}" in names
            new = [s for s in steps if s >= start]
            stats["commits"] += len(new)
            if not new:
                stats["before_first_commit"] += 1

            # What did the kill interrupt? A pending record that outlived its save names the objects of a
            # save that was in flight; objects that no manifest references mean it died before its commit.
            referenced = _referenced(url)
            stored = set(Repository(url).list_objects())
            left = {k: v for k, v in _pending(root).items() if k not in pending_before}
            assert len(left) <= 1
            if left:
                (objs,) = left.values()
                if objs - referenced:
                    stats["mid_save"] += 1
                    hits.append(trial)
                    written = (objs - referenced) & stored
                    if written:
                        stats["orphans_written"] += 1
                        # Objects are renamed into place whole: one under its final name is never partial,
                        # so a later save that finds it (and skips writing it) references good bytes.
                        repo = Repository(url)
                        for h in written:
                            repo.read_object(h)  # raises CorruptObjectError on a torn object
                else:
                    stats["after_commit"] += 1  # died between the manifest commit and removing the record
            if _files(root, "objects", ".tmp-*") - temps_before:
                stats["tmp_files"] += 1  # died while writing an object

            if trial % 5 == 2:  # gc between trials, with stale leftovers accumulated; nothing may break
                gc(url)
                _check_repository(url, restore_all=False)
    finally:
        server.close()

    print(f"\ncrash trials: {TRIALS} ({', '.join(sorted(set(server.modes)))}), stats: {stats}, mid-save trials: {hits}")
    assert stats["mid_save"] >= 3, f"too few kills landed inside a save to prove anything: {stats}"
    # Killed while objects were being written: they are temp files (renamed only once all are fsync'd) or, for
    # an earlier save's pipeline, complete objects no manifest references yet. Either proves the window was hit.
    assert stats["orphans_written"] + stats["tmp_files"] >= 1, stats
    assert stats["commits"] >= TRIALS // 2, stats

    # Final state: every listed checkpoint restores bit-exactly, and the CLI agrees that all verify.
    names = _check_repository(url, restore_all=True)
    assert names, "no checkpoint survived 20 trials"
    cli = _cli_verify(url)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert all(f"ok       {n}:" in cli.stdout for n in names), cli.stdout
    assert "CORRUPT" not in cli.stdout

    # gc with the crashed saves' pending records still fresh: it removes the orphans of deleted checkpoints,
    # keeps what a (possibly still running) save has announced, and breaks nothing.
    referenced = _referenced(url)
    protected = set().union(*_pending(root, temp_too=True).values())
    stored = set(Repository(url).list_objects())
    orphans = stored - referenced
    assert orphans, "the crashes and deletions left no orphan objects: gc is not being tested"
    report = gc(url)
    after = set(Repository(url).list_objects())
    assert referenced <= after
    assert after == referenced | (stored & protected)
    assert report.objects_removed == len(stored - after)
    _check_repository(url, restore_all=False)

    # Time passes (pending records and temp files older than STALE_AFTER belong to dead processes): gc now
    # removes every orphan and temp file, and every checkpoint still verifies and restores.
    old = time.time() - STALE_AFTER - 3600
    leftovers = [*(root / "pending").glob("*"), *(root / "objects").rglob(".tmp-*"), *(root / "checkpoints").glob(".tmp-*")]
    for p in leftovers:
        os.utime(p, (old, old))
    report = gc(url)
    assert set(Repository(url).list_objects()) == referenced, "orphans survived gc"
    assert not [p for p in root.rglob(".tmp-*")], "temp files survived gc"
    assert not list((root / "pending").glob("*")), "stale pending records survived gc"
    assert report.temp_files_removed == len(leftovers)
    assert report.objects_kept == len(referenced)
    assert _check_repository(url, restore_all=True) == names
    cli = _cli_verify(url)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    again = gc(url)
    assert (again.objects_removed, again.temp_files_removed) == (0, 0)
    print(f"gc: removed {report.objects_removed} objects and {len(leftovers)} temp files and stale pending records")


def test_worker_state_is_a_function_of_the_step() -> None:
    """The crash test's expectations are meaningful: different steps give different tensors, equal steps equal."""
    model = worker.build_model()
    a, b, c = (worker.expected_state(k, model) for k in (7, 7, 8))
    name = next(iter(a["param"]))
    assert torch.equal(a["param"][name], b["param"][name])
    assert not torch.equal(a["param"][name], c["param"][name])
    assert not torch.equal(a["param"][name], a["exp_avg"][name])
    assert sum(p.numel() for p in model.parameters()) * 4 >= 32 << 20
