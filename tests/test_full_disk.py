"""A full disk, for real: a small tmpfs that the test mounts (root needed; skipped with the reason otherwise).

Fill it with checkpoints until a save fails: the failure is a typed :class:`~ckptkit.errors.StorageFullError`
(an ``OSError`` with ``errno`` ENOSPC) naming the file and the repository, and nothing partial is committed;
every listed checkpoint still restores bit-exactly. Then, with 0 bytes free, retention's prune (which moves
manifests into ``lineage/``: a rename, no new data) and ``ckptkit gc`` (whose lock falls back to an empty file)
free space, and saves work again. When not even an empty file fits (no inodes left), ``ckptkit gc`` says so in one
line, exit status 2, no traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, Retention
from ckptkit.errors import CheckpointNotFoundError, StorageFullError
from ckptkit.storage import Repository

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts and /proc/self/fd are Linux's")

PAGE = 4096


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot run mount(8): {err}")
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs -o {options} was refused (the test needs root): {done.stderr.strip()[:300]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)


def _fill(path: Path) -> int:
    """Write ``path`` until the disk is full (page by page); its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    size = 0
    try:
        while True:
            size += os.write(fd, b"\xa5" * PAGE)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    return size


def _free_pages(where: Path) -> int:
    return os.statvfs(where).f_bavail


def _model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(512, 512)  # 1 MiB of weights: one object per save


def _leftovers(root: Path) -> list[str]:
    """Temporary files and pending records: what an interrupted write would leave."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".tmp-") or p.parent.name == "pending")  # fmt: skip


def _check_all_restore(url: str, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    names = Repository(url).list()
    assert sorted(names) == sorted(saved), (names, sorted(saved))
    bad = [(r.name, r.problems) for r in ckptkit.verify(url) if not r.ok]
    assert not bad, bad
    for name in names:
        fresh = _model(999)
        ckptkit.restore(url, {"model": fresh}, name, rng=False)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, saved[name][k]), f"{name}: {k} differs"


def _gc_cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptkit.cli", "gc", url], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


@pytest.mark.timeout(180)
def test_a_full_disk_fails_saves_cleanly_and_prune_and_gc_free_it(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "size=8m") as disk:
        root = disk / "repo"
        url = str(root)
        saved: dict[str, dict[str, torch.Tensor]] = {}
        full: StorageFullError | None = None
        for step in range(1, 40):  # fill it: every save writes a new 1 MiB object
            model = _model(step)
            name = f"step-{step:08d}"  # the manager's default names: its retention prunes them below
            try:
                ckptkit.save(url, {"model": model}, name, rng=False)
            except StorageFullError as err:
                full = err
                break
            saved[name] = {k: v.clone() for k, v in model.state_dict().items()}
        assert full is not None and len(saved) >= 4, f"8 MiB held {len(saved)} checkpoints without filling up"
        assert isinstance(full, OSError) and full.errno == errno.ENOSPC
        assert url in str(full) and "ckptkit gc" in str(full) and full.path.startswith(url), str(full)
        # Nothing partial: the failed save is not listed, left no temporary file or pending record, and every
        # listed checkpoint restores bit-exactly.
        assert name not in Repository(url).list()
        assert _leftovers(root) == []
        _check_all_restore(url, saved)

        # Now 0 bytes free (what the failed save left free too), and a save that only needs its pending record
        # and manifest (its tensors are stored already) fails the same way.
        _fill(disk / "filler")
        assert _free_pages(disk) == 0
        with pytest.raises(StorageFullError):
            ckptkit.save(url, {"model": _model(1)}, "dedup", rng=False)
        assert _leftovers(root) == [] and "dedup" not in Repository(url).list()

        # Prune on the full disk: manifests are moved into lineage/ (a rename: no new data).
        repo = Repository(url)
        manifests = {m.name: m for m in ckptkit.api.checkpoints(url)}
        mgr = CheckpointManager(url, {"model": _model(0)}, retention=Retention(keep_last=2), gc=False, rng=False)
        pruned = mgr.prune()
        mgr.close()
        kept = sorted(saved)[-2:]
        assert sorted(pruned) == sorted(saved)[:-2] and sorted(repo.list()) == kept
        for n in pruned:  # their history stays readable
            assert repo.read_archived(manifests[n].id) == (root / "lineage" / f"{manifests[n].id}.json").read_bytes()
        assert _free_pages(disk) == 0, "prune wrote nothing, freed nothing: gc frees the objects"

        # gc on the full disk (its lock cannot hold a record there: it is an empty file then).
        done = _gc_cli(url)
        assert done.returncode == 0, done.stdout + done.stderr
        removed = re.search(r"removed (\d+) object", done.stdout)
        assert removed and int(removed.group(1)) >= len(pruned) and "Traceback" not in done.stderr, done
        assert _free_pages(disk) * PAGE >= len(pruned) << 20
        assert not (root / "gc.lock").exists()

        # Saves work again; everything listed restores.
        model = _model(100)
        ckptkit.save(url, {"model": model}, "after", rng=False)
        saved = {n: saved[n] for n in kept} | {"after": {k: v.clone() for k, v in model.state_dict().items()}}
        _check_all_restore(url, saved)
        assert _leftovers(root) == []


@pytest.mark.timeout(120)
def test_no_room_for_the_manifest_commits_nothing(tmp_path: Path) -> None:
    """One page left: a save whose tensors are all stored already writes its pending record into it, and then
    finds no room for its manifest. Nothing is committed, the record is removed, the error names the manifest."""
    with _tmpfs(tmp_path / "disk", "size=4m") as disk:
        url = str(disk / "repo")
        model = _model(1)
        ckptkit.save(url, {"model": model}, "first", rng=False)
        size = _fill(disk / "filler")
        os.truncate(disk / "filler", size - PAGE)
        assert _free_pages(disk) == 1
        with pytest.raises(StorageFullError) as err:
            ckptkit.save(url, {"model": model}, "second", rng=False)  # the same tensors: no object to write
        assert err.value.path.endswith("checkpoints/second.json"), str(err.value)
        assert Repository(url).list() == ["first"] and _leftovers(disk / "repo") == []
        os.unlink(disk / "filler")
        ckptkit.save(url, {"model": model}, "second", rng=False)
        assert Repository(url).list() == ["first", "second"]


@pytest.mark.parametrize("where", ["pending", "objects", "checkpoints"])
def test_enospc_reported_by_fsync_is_a_storage_full_error(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filesystems with delayed allocation (ext4, xfs, NFS) may report a full disk only at fsync: the same typed
    error, the temporary file removed, nothing committed."""
    url = str(tmp_path / "repo")
    ckptkit.save(url, {"model": _model(0)}, "first", rng=False)
    fsync = os.fsync

    def full_fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if f"/{where}/" in target and os.path.basename(target).startswith(".tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_fsync)
    with pytest.raises(StorageFullError) as err:
        ckptkit.save(url, {"model": _model(1)}, "second", rng=False)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and f"/{where}/" in err.value.path, str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    assert Repository(url).list() == ["first"] and _leftovers(tmp_path / "repo") == []
    assert all(r.ok for r in ckptkit.verify(url))


@pytest.mark.timeout(120)
def test_gc_where_not_even_its_lock_fits_says_so_in_one_line(tmp_path: Path) -> None:
    """No inodes left: not even gc's empty-file lock can be made. ``ckptkit gc`` prints one `error:` line that
    names the lock and the way out, exits 2, no traceback; and a save fails with the typed error."""
    with _tmpfs(tmp_path / "disk", "size=8m,nr_inodes=64") as disk:
        url = str(disk / "repo")
        ckptkit.save(url, {"model": _model(0)}, "a", rng=False)
        (disk / "filler").mkdir()
        n = 0
        with contextlib.suppress(OSError):
            while True:
                os.close(os.open(disk / "filler" / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                n += 1
        with pytest.raises(StorageFullError):
            ckptkit.save(url, {"model": _model(1)}, "b", rng=False)
        done = _gc_cli(url)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
        assert "gc.lock" in lines[0] and "no space left" in lines[0] and "delete" in lines[0], lines[0]
        assert not (disk / "repo" / "gc.lock").exists()
        (disk / "filler" / "0").unlink()  # one inode: enough for gc's (empty) lock
        done = _gc_cli(url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert Repository(url).list() == ["a"] and all(r.ok for r in ckptkit.verify(url))


def test_retire_moves_the_manifest_on_every_backend(repo_url: str) -> None:
    """Prune's one call: the manifest moves to lineage/ (rename, server-side copy + delete, or copy + delete),
    byte for byte; the checkpoint is gone, its history readable, its objects garbage."""
    repo = Repository(repo_url)
    m = ckptkit.save(repo_url, {"model": _model(0)}, "a", rng=False)
    raw = repo.read_manifest("a")
    repo.retire("a", m.id)
    assert repo.list() == [] and repo.read_archived(m.id) == raw
    with pytest.raises(CheckpointNotFoundError):
        repo.retire("a", m.id)  # already pruned (by another process, say)
    assert ckptkit.api.gc(repo_url).objects_removed == 1 and repo.list_objects() == {}


@pytest.mark.timeout(120)
def test_a_disk_that_fills_during_a_direct_write_fails_cleanly(tmp_path: Path) -> None:
    """Objects of 4 MiB and more go through O_DIRECT with direct_io=True (tmpfs takes it on Linux 6.6+; older kernels refuse it and
    the writes are buffered, the same test then): ENOSPC from a direct write is the same typed error, with the
    temporary file removed and every listed checkpoint intact."""
    with _tmpfs(tmp_path / "disk", "size=40m") as disk:
        url = str(disk / "repo")
        saved: dict[str, dict[str, torch.Tensor]] = {}
        full: StorageFullError | None = None
        for step in range(1, 12):  # 9 MiB objects: a 40 MiB disk fills at the fourth or fifth
            torch.manual_seed(step)
            model = torch.nn.Linear(1536, 1536)
            try:
                ckptkit.save(Repository(url, direct_io=True), {"model": model}, f"step-{step}", rng=False)
            except StorageFullError as err:
                full = err
                break
            saved[f"step-{step}"] = {k: v.clone() for k, v in model.state_dict().items()}
        assert full is not None and len(saved) >= 2, f"40 MiB held {len(saved)} checkpoints of 9 MiB"
        assert full.errno == errno.ENOSPC and "/objects/" in full.path, str(full)
        assert _leftovers(disk / "repo") == [] and sorted(Repository(url).list()) == sorted(saved)
        for name, tensors in saved.items():
            fresh = torch.nn.Linear(1536, 1536)
            ckptkit.restore(url, {"model": fresh}, name, rng=False)
            assert all(torch.equal(v, tensors[k]) for k, v in fresh.state_dict().items()), name
