"""Conformance suite for repositories: every backend must behave the same through the same code path."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import ckptkit
from ckptkit.api import checkpoints, gc
from ckptkit.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptObjectError, RepositoryBusyError
from ckptkit.hashing import hash_bytes
from ckptkit.storage import Repository


def _put(repo: Repository, data: bytes) -> str:
    h = hash_bytes(data)
    repo.write_object(h, [memoryview(data)])
    return h


def test_empty_repository_lists_nothing(repo_url: str) -> None:
    repo = Repository(repo_url)
    assert repo.list() == []
    assert repo.list_objects() == {}
    with pytest.raises(CheckpointNotFoundError) as err:
        ckptkit.inspect(repo_url)
    assert isinstance(err.value, FileNotFoundError)


def test_object_round_trip_is_hash_verified(repo_url: str) -> None:
    repo = Repository(repo_url)
    data = bytes(range(256)) * 100
    h = _put(repo, data)
    assert repo.has_object(h)
    assert bytes(repo.read_object(h, len(data))) == data
    assert repo.list_objects() == {h: len(data)}
    missing = hash_bytes(b"never written")
    assert not repo.has_object(missing)
    with pytest.raises(FileNotFoundError):
        repo.read_object(missing)
    with pytest.raises(CorruptObjectError) as err:
        repo.read_object(h, len(data) + 1)
    assert err.value.path == repo.object_path(h)


def test_commit_is_immutable_and_listing_sees_only_manifests(repo_url: str) -> None:
    repo = Repository(repo_url)
    repo.commit("a", b"{}")
    repo.commit("b", b"{}")
    with pytest.raises(CheckpointExistsError):
        repo.commit("a", b'{"other": 1}')
    assert repo.read_manifest("a") == b"{}"
    # Files that are not manifests (temporaries, foreign files) are never listed as checkpoints.
    repo.fs.pipe_file(repo.root + "/checkpoints/.tmp-123", b"partial")
    repo.fs.pipe_file(repo.root + "/checkpoints/notes.txt", b"x")
    assert sorted(repo.list()) == ["a", "b"]
    repo.delete("a")
    assert repo.list() == ["b"]
    with pytest.raises(CheckpointNotFoundError):
        repo.read_manifest("a")
    with pytest.raises(CheckpointNotFoundError):
        repo.delete("a")


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", ".hidden", "x" * 200, "name.json", "sp ace"])
def test_unsafe_names_are_refused(repo_url: str, bad: str) -> None:
    repo = Repository(repo_url)
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        repo.commit(bad, b"{}")
    with pytest.raises(ValueError):
        ckptkit.save(repo_url, {"model": torch.nn.Linear(1, 1)}, bad)


def test_invalid_object_hash_is_refused(repo_url: str) -> None:
    with pytest.raises(ValueError, match="invalid object hash"):
        Repository(repo_url).object_path("../../etc/passwd")


def test_save_restore_on_backend(repo_url: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    m = ckptkit.save(repo_url, {"model": model}, "one")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ckptkit.restore(repo_url, {"model": fresh}, "one")
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [c.name for c in checkpoints(repo_url)] == ["one"]
    assert ckptkit.inspect(repo_url).id == m.id


def test_identical_content_is_stored_once(repo_url: str) -> None:
    model = torch.nn.Linear(64, 64)
    ckptkit.save(repo_url, {"model": model}, "a", rng=False)
    before = Repository(repo_url).list_objects()
    ckptkit.save(repo_url, {"model": model}, "b", rng=False)
    assert Repository(repo_url).list_objects() == before


def test_gc_removes_only_unreferenced_objects(repo_url: str) -> None:
    model = torch.nn.Linear(32, 32)
    ckptkit.save(repo_url, {"model": model}, "keep")
    with torch.no_grad():
        model.weight.add_(1)
    ckptkit.save(repo_url, {"model": model}, "drop")
    repo = Repository(repo_url)
    orphan = _put(repo, b"orphan from a crashed save")
    repo.delete("drop")
    report = gc(repo_url, dry_run=True)
    assert report.objects_removed >= 2 and repo.has_object(orphan)  # dry run deletes nothing
    report = gc(repo_url)
    assert not repo.has_object(orphan)
    assert report.objects_removed >= 2
    assert all(r.ok for r in ckptkit.verify(repo_url))
    fresh = torch.nn.Linear(32, 32)
    ckptkit.restore(repo_url, {"model": fresh}, "keep")


def test_gc_keeps_objects_of_a_save_in_flight(repo_url: str) -> None:
    repo = Repository(repo_url)
    h = _put(repo, b"being written by another process")
    with repo.pending([h]):
        gc(repo_url)
        assert repo.has_object(h)
    gc(repo_url)
    assert not repo.has_object(h)


def test_save_waits_for_a_running_gc(repo_url: str) -> None:
    """A save that starts while gc holds the lock checks for existing objects only after gc has finished."""
    repo = Repository(repo_url)
    model = torch.nn.Linear(8, 8)
    ckptkit.save(repo_url, {"model": model}, "old", rng=False)
    repo.delete("old")  # its objects are now garbage, but the next save would reuse them
    done = threading.Event()

    def slow_gc() -> None:
        with repo.gc_lock():
            time.sleep(0.5)
            repo.sweep(set())  # deletes every object: nothing is committed
        done.set()

    t = threading.Thread(target=slow_gc)
    t.start()
    time.sleep(0.1)
    ckptkit.save(repo_url, {"model": model}, "new", rng=False)  # would reference the deleted objects
    t.join()
    assert done.is_set()
    assert all(r.ok for r in ckptkit.verify(repo_url, "new")), "save reused objects gc deleted"


def test_second_gc_is_refused_while_one_runs(repo_url: str) -> None:
    repo = Repository(repo_url)
    with repo.gc_lock(), pytest.raises(RepositoryBusyError):
        gc(repo_url)


def test_of_two_gcs_that_both_saw_no_lock_only_one_takes_it(repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = Repository(repo_url), Repository(repo_url)
    with first.gc_lock():
        held = first.fs.cat_file(first.root + "/gc.lock")
        # The second gc checked for a lock just before the first one wrote it.
        monkeypatch.setattr(second, "_gc_lock_held", lambda: False)
        with pytest.raises(RepositoryBusyError, match=r"gc\.lock"), second.gc_lock():
            pytest.fail("two gcs held the lock at once")
        assert first.fs.cat_file(first.root + "/gc.lock") == held, "the loser replaced or removed the lock"
    assert not first.fs.exists(first.root + "/gc.lock")


def _crashed_gc_lock(repo: Repository, lease: float | None) -> bytes:
    """The gc.lock a gc killed at once leaves behind: its record, never renewed again (a dead pid of this host)."""
    import json
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    rec: dict[str, object] = {"host": socket.gethostname(), "pid": int(dead.stdout), "time": time.time()}
    if lease is not None:
        rec.update(version=2, token="killed-gc", lease=lease, expires=time.time() + lease)
    repo.fs.makedirs(repo.root, exist_ok=True)
    repo.fs.pipe_file(repo.root + "/gc.lock", json.dumps(rec).encode())
    return json.dumps(rec).encode()


@pytest.mark.parametrize("lease", [2.0, None], ids=["lease", "no-lease"])
def test_a_gc_lock_left_by_a_killed_gc_blocks_saves_only_until_its_lease_runs_out(
    repo_url: str, lease: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed gc never blocks saves for longer than its lease: the lock is not renewed, so once its lease runs
    out saves ignore it and the next gc takes it over. Not at once: a dead pid of this host proves nothing (a live
    gc in another PID namespace has one), so until then a second gc is refused and a save waits. A lock without a
    lease (older format) gets the default lease, LOCK_STALE_AFTER (shortened here)."""
    from ckptkit import storage

    if lease is None:
        monkeypatch.setattr(storage.repository, "LOCK_STALE_AFTER", 2.0)
    repo = Repository(repo_url)
    written = time.monotonic()
    _crashed_gc_lock(repo, lease)
    with pytest.raises(RepositoryBusyError, match="lease"):
        gc(repo_url)
    ckptkit.save(repo_url, {"model": torch.nn.Linear(2, 2)}, "a")  # waits for the lease to run out, then saves
    waited = time.monotonic() - written
    assert 0.9 < waited < 15, f"a save waited {waited:.1f}s for a crashed gc's lock with a 2 s lease"
    assert repo.fs.exists(repo.root + "/gc.lock"), "saves leave a stale lock for the next gc to take over"
    gc(repo_url)  # takes the stale lock over, and gives it back
    assert not repo.fs.exists(repo.root + "/gc.lock")
    assert all(r.ok for r in ckptkit.verify(repo_url))


def test_a_running_gc_renews_its_lease(repo_url: str) -> None:
    """A live gc holds the lock for as long as it runs, many leases long: saves wait, other gcs are refused."""
    repo, other = Repository(repo_url), Repository(repo_url)
    with repo.gc_lock(lease=0.6):
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert other._gc_lock_held(), "a live gc's lock looked stale"
            time.sleep(0.1)
        with pytest.raises(RepositoryBusyError):
            gc(repo_url)
        with pytest.raises(RepositoryBusyError, match="running gc"), other.pending([], wait=0.5):
            pytest.fail("a save went ahead while gc held the lock")
    assert not other._gc_lock_held() and not repo.fs.exists(repo.root + "/gc.lock")


def test_gc_removes_what_crashed_saves_left_once_stale(repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptkit.storage.repository
    from ckptkit import storage

    repo = Repository(repo_url)
    ckptkit.save(repo_url, {"model": torch.nn.Linear(2, 2)}, "a")
    orphan = _put(repo, b"written by a save that was killed")
    repo.fs.pipe_file(repo.root + "/pending/dead.json", b'{"objects": ["%s"]}' % orphan.encode())
    if repo.local:
        for sub in ("checkpoints", "objects"):
            with open(f"{repo.root}/{sub}/.tmp-dead", "wb") as f:
                f.write(b"partial")
    gc(repo_url)
    assert repo.has_object(orphan)  # a fresh pending record protects its objects
    monkeypatch.setattr(storage.repository, "STALE_AFTER", -1.0)  # as if 6 hours had passed
    report = gc(repo_url)
    assert not repo.has_object(orphan) and not repo.fs.exists(repo.root + "/pending/dead.json")
    assert report.temp_files_removed >= (3 if repo.local else 1)
    assert repo.list() == ["a"] and all(r.ok for r in ckptkit.verify(repo_url))
