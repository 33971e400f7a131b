"""Concurrency: gc next to saves that commit while it scans, gc locks across PID namespaces, locks holding garbage.

The protocol under test (docs/format.md, "Concurrency contract"): a save writes its pending record, waits while a
gc holds a live lock, checks and writes its objects, commits its manifest, removes its record; gc takes the lock,
reads the pending records, and only then lists the manifests and the objects. The lock is a lease (renewed by the
running gc), never judged by a process id.

* the bad interleaving, forced deterministically on every backend (a save that was past its lock check commits
  and removes its record in the middle of gc's scan);
* a real stress run: two saver processes and a gc loop in one repository, then every checkpoint restores;
* a live gc lock held in one PID namespace is neither stolen nor ignored from another one (``unshare``);
* a gc.lock holding ``[]``, ``null``, a number or garbage is judged by its age against the lease.
"""

from __future__ import annotations

import datetime
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
import ckptkit.hashing
from ckptkit.api import gc
from ckptkit.errors import RepositoryBusyError
from ckptkit.storage import Repository

REPO_ROOT = Path(__file__).resolve().parent.parent


def _model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))


def _assert_restores(url: str, name: str, model: torch.nn.Module) -> None:
    fresh = _model(12345)
    ckptkit.restore(url, {"model": fresh}, name, rng=False)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: {k} differs after restore"


# --- 1. a save that commits during gc's scan ------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [False, True], ids=["new-objects", "reused-objects"])
def test_gc_keeps_a_checkpoint_committed_during_its_scan(
    repo_url: str, reuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving that lost checkpoints: a save passes its lock check before gc takes the lock; gc lists
    the manifests (the save has not committed yet); the save then writes (or, with ``reused-objects``, reuses
    objects that an earlier, deleted checkpoint left as garbage), commits and removes its pending record; only
    then did gc read the pending records, so the save was in neither set and gc deleted its objects. gc now reads
    the pending records when it takes the lock, before it lists anything."""
    ckptkit.save(repo_url, {"model": _model(0)}, "older", rng=False)  # something for gc to list
    model = _model(1)
    if reuse:  # the same tensors as a deleted checkpoint: the save finds its objects and writes nothing
        ckptkit.save(repo_url, {"model": model}, "deleted", rng=False)
        Repository(repo_url).delete("deleted")

    saver_checking, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    missing_objects, list_manifests = Repository.missing_objects, Repository.list

    def paused_check(self: Repository, hashes: Any) -> list[str]:
        if threading.current_thread().name == "saver":  # past its lock check, about to check for its objects
            saver_checking.set()
            assert go.wait(60)
        return missing_objects(self, hashes)

    def save() -> None:
        try:
            ckptkit.save(repo_url, {"model": model}, "during-gc", rng=False)
        except BaseException as err:
            errors.append(err)

    saver = threading.Thread(target=save, name="saver")

    def listing_then_the_save_commits(self: Repository) -> list[str]:
        names = list_manifests(self)
        if threading.current_thread() is threading.main_thread() and not go.is_set():
            go.set()  # gc has listed the manifests: the save checks, writes, commits, removes its record now
            saver.join(60)
            assert not saver.is_alive(), "the save did not finish while gc waited"
        return names

    monkeypatch.setattr(Repository, "missing_objects", paused_check)
    saver.start()
    assert saver_checking.wait(60), "the save never reached its object check"
    monkeypatch.setattr(Repository, "list", listing_then_the_save_commits)
    try:
        report = gc(repo_url)
    finally:
        go.set()
        saver.join(60)
        monkeypatch.undo()
    assert not errors, errors
    assert go.is_set() and sorted(Repository(repo_url).list()) == ["during-gc", "older"]
    bad = [(r.name, r.problems) for r in ckptkit.verify(repo_url) if not r.ok]
    assert not bad, f"gc deleted objects of a checkpoint committed during its scan: {bad}"
    _assert_restores(repo_url, "during-gc", model)
    assert report.objects_removed == 0


def test_a_gc_that_lost_its_lock_stops_before_deleting(repo_url: str) -> None:
    """A gc whose lock was taken over (it was paused past its lease, say) deletes nothing more, and leaves the
    new holder's lock in place."""
    repo = Repository(repo_url)
    orphan = ckptkit.hashing.hash_bytes(b"an orphan")
    repo.write_object(orphan, [memoryview(b"an orphan")])
    other = b'{"version": 2, "token": "another gc", "lease": 120}'
    with pytest.raises(RepositoryBusyError, match="lost"), repo.gc_lock():
        repo.fs.pipe_file(repo.root + "/gc.lock", other)  # taken over
        repo.sweep(set())
    assert repo.has_object(orphan)
    assert repo.fs.cat_file(repo.root + "/gc.lock") == other


# --- 2. a real stress run -------------------------------------------------------------------------------------

SAVER = r"""
import json, sys, time
import ckptkit
from ckptkit.errors import CheckpointNotFoundError
from ckptkit.storage import Repository

sys.path.insert(0, sys.argv[4])
from test_concurrency import _state

url, wid, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
repo = Repository(url)
mine = []
print("ready", flush=True)
end = time.monotonic() + seconds
k = 0
while time.monotonic() < end:
    v, u = 10 * wid + k % 4, 1000 * wid + k
    name = f"w{wid}-{k:05d}"
    ckptkit.save(url, {"model": _state(v, u)}, name, rng=False, object_size=4096)
    print(json.dumps({"name": name, "v": v, "u": u}), flush=True)
    mine.append(name)
    while len(mine) > 2:
        try:
            repo.delete(mine.pop(0))
        except CheckpointNotFoundError:
            pass
    k += 1
"""


def _state(v: int, u: int) -> torch.nn.Sequential:
    """A saver's state: one module the same in every save of both savers, one of four variants per saver (they
    recur, so a save reuses objects that deleting an older checkpoint made garbage), one new in every save."""
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(8, 8))
    with torch.no_grad():
        m[0].weight.fill_(0.5)
        m[0].bias.fill_(0.25)
        m[1].weight.copy_(torch.arange(1024.0).reshape(32, 32) + v)
        m[1].bias.fill_(float(v))
        m[2].weight.fill_(float(u))
        m[2].bias.fill_(-float(u))
    return m


def _readline(p: subprocess.Popen[str], timeout: float) -> str:
    """One line of ``p``'s stdout, waiting at most ``timeout`` seconds ("" at its end or on timeout)."""
    assert p.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return p.stdout.readline()


@pytest.mark.timeout(120)
def test_two_saver_processes_and_a_gc_loop_lose_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    for i in range(100):  # manifests for gc to read: a scan long enough for saves to commit in the middle of it
        ckptkit.save(url, {"model": torch.nn.Linear(2, 2)}, f"base-{i:03d}", rng=False)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    savers = [subprocess.Popen([sys.executable, "-c", SAVER, url, str(w), "8", str(Path(__file__).parent)],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env) for w in range(2)]  # fmt: skip
    try:
        for p in savers:
            assert _readline(p, 60) == "ready\n", "a saver did not start"
        runs = removed = 0
        while any(p.poll() is None for p in savers):
            removed += gc(url).objects_removed  # the only gc: never refused
            runs += 1
            time.sleep(0.02)  # let saves in between two gcs (a save waits while gc holds the lock)
        outs = [p.communicate(timeout=60) for p in savers]
    finally:
        for p in savers:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(savers, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    committed = {}
    for out, _ in outs:
        for line in out.splitlines()[1:]:
            rec = json.loads(line)
            committed[rec["name"]] = (rec["v"], rec["u"])
    print(f"stress: {len(committed)} saves, {runs} gc runs, {removed} objects removed")
    assert len(committed) >= 10 and runs >= 5 and removed > 0, (len(committed), runs, removed)
    gc(url)
    survivors = Repository(url).list()
    assert len(survivors) == 104  # the base ones, and the last two of each saver
    bad = [(r.name, r.problems) for r in ckptkit.verify(url) if not r.ok]
    assert not bad, f"checkpoints broken by a concurrent gc ({runs} gc runs, {len(committed)} saves): {bad}"
    for name in [n for n in survivors if n.startswith("w")]:
        fresh = _state(-1, -1)
        ckptkit.restore(url, {"model": fresh}, name, rng=False)
        for a, b in zip(_state(*committed[name]).state_dict().values(), fresh.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


# --- 3. the gc lock across PID namespaces ---------------------------------------------------------------------

HOLDER = r"""
import os, subprocess, sys
url, lease = sys.argv[1], sys.argv[2]
if os.getpid() == 1:
    # This namespace's init. Hold the lock from a process whose pid the other namespace does not have (there,
    # pid 1 is the observer itself, and small pids its threads): use up some pids first.
    for _ in range(150):
        subprocess.run(["true"])
    sys.exit(subprocess.call([sys.executable, __file__, url, lease]))
from ckptkit.storage import Repository
with Repository(url).gc_lock(lease=float(lease)):
    print("held", os.getpid(), flush=True)
    sys.stdin.readline()  # until the test says so (or closes stdin)
print("released", flush=True)
"""

OBSERVER = r"""
import json, os, sys, time
from ckptkit.engine.gc import collect_garbage
from ckptkit.errors import RepositoryBusyError
from ckptkit.storage import Repository
url, holder_pid, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"pid": os.getpid()}
try:
    os.kill(holder_pid, 0)
    out["holder_pid_exists_here"] = True
except ProcessLookupError:
    out["holder_pid_exists_here"] = False
repo = Repository(url)
try:
    collect_garbage(repo)
    out["gc"] = "ran"
except RepositoryBusyError:
    out["gc"] = "refused"
t0 = time.monotonic()
try:
    with repo.pending([], wait=wait):
        out["save"] = "went ahead"
except RepositoryBusyError:
    out["save"] = "gave up waiting"
out["waited"] = time.monotonic() - t0
print(json.dumps(out), flush=True)
"""


def _unshare(*argv: str) -> list[str]:
    return ["unshare", "--pid", "--fork", "--mount-proc", *argv]


@pytest.fixture(scope="module")
def pid_namespaces() -> None:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux and unshare(1) (util-linux)")
    try:
        probe = subprocess.run(_unshare("true"), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"unshare --pid --fork --mount-proc could not run: {err}")
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid --fork --mount-proc was refused (needs root or user namespaces): "
                    f"{probe.stderr.strip()[:300]}")  # fmt: skip


@pytest.mark.timeout(120)
def test_a_live_gc_lock_in_another_pid_namespace_is_neither_stolen_nor_ignored(
    tmp_path: Path, pid_namespaces: None
) -> None:
    """Containers that share a host name but not a PID namespace: a gc holding the lock in one; a gc and a save
    in another. The holder's pid does not exist there, which the old check took for a dead process on this host
    (and removed the live lock). Now the lock is a lease that the holder renews: the other gc is refused, the save
    waits (past several leases) and goes ahead once the holder lets go; a holder killed outright is taken over
    only once its lease has run out."""
    url = str(tmp_path / "repo")
    ckptkit.save(url, {"model": _model(0)}, "a", rng=False)
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    lock_path = tmp_path / "repo" / "gc.lock"

    def holder(lease: float) -> tuple[subprocess.Popen[str], int]:
        p = subprocess.Popen(_unshare(sys.executable, str(script), url, str(lease)), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                             start_new_session=True)  # fmt: skip
        line = _readline(p, 60)
        assert line.startswith("held "), f"the holder did not take the lock: {line!r}"
        return p, int(line.split()[1])

    def observe(pid: int, wait: float) -> subprocess.Popen[str]:
        return subprocess.Popen(_unshare(sys.executable, "-c", OBSERVER, url, str(pid), str(wait)), text=True,
                                stdout=subprocess.PIPE, env=env, start_new_session=True)  # fmt: skip

    def result(p: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
        return dict(json.loads(out))

    procs: list[subprocess.Popen[str]] = []
    try:
        # A live holder, lease 0.5 s: it must renew it several times while the others try.
        h, pid = holder(0.5)
        procs.append(h)
        held = json.loads(lock_path.read_bytes())
        assert held["pid"] == pid and pid > 100
        seen = result(observe(pid, wait=2.0))
        assert seen["holder_pid_exists_here"] is False  # what the old check took for a dead gc
        assert seen["gc"] == "refused", f"a gc in another PID namespace stole a live lock: {seen}"
        assert seen["save"] == "gave up waiting" and seen["waited"] >= 1.9, seen
        assert json.loads(lock_path.read_bytes())["token"] == held["token"], "the live lock was replaced"

        waiting = observe(pid, wait=60.0)  # a save that waits for the holder
        procs.append(waiting)
        time.sleep(2.0)
        assert waiting.poll() is None, "the save did not wait for the live gc"
        assert h.stdin is not None
        h.stdin.write("release\n")
        h.stdin.flush()
        assert _readline(h, 30) == "released\n"
        seen = result(waiting)
        assert seen["gc"] == "refused" and seen["save"] == "went ahead" and seen["waited"] >= 0.5, seen
        assert not lock_path.exists()

        # A holder killed outright (SIGKILL to its whole namespace): its lock stays until the lease runs out.
        h, pid = holder(2.0)
        procs.append(h)
        os.killpg(h.pid, signal.SIGKILL)
        h.wait(30)
        killed = time.monotonic()
        repo = Repository(url)
        assert lock_path.exists() and repo._gc_lock_held(), "a killed gc's lock was judged stale at once"
        with pytest.raises(RepositoryBusyError):
            gc(url)
        seen = result(observe(pid, wait=60.0))
        assert seen["save"] == "went ahead", seen
        assert time.monotonic() - killed >= 1.5, "a killed gc's lock was ignored before its lease ran out"
        gc(url)  # takes the stale lock over
        assert not lock_path.exists()
        assert all(r.ok for r in ckptkit.verify(url))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# --- 4. a lock holding garbage --------------------------------------------------------------------------------

GARBAGE = [b"[]", b"null", b"42", b"-1.5e308", b'"gc"', b"", b"\xff\xfe\x00 not json", b"[" * 5000,
           b'{"host": ["x"], "pid": {}, "lease": "soon", "token": 7}', b'{"lease": 1e308}', b'{"lease": -1}']  # fmt: skip


def _age(repo: Repository, key: str, seconds: float) -> None:
    """Make the stored object ``key`` look ``seconds`` older (S3 cannot be back-dated: wait instead)."""
    path = repo.root + "/" + key
    if repo.local:
        t = time.time() - seconds
        os.utime(path, (t, t))
    elif repo.s3:
        time.sleep(seconds)
    else:
        f = repo.fs.store[path]
        f.created = f.created - datetime.timedelta(seconds=seconds)


def test_a_lock_holding_garbage_is_judged_by_its_age(repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gc.lock that is not a lock record (``[]``, ``null``, a number, bytes that are not JSON, JSON nested too
    deep to parse, a record with a bogus lease) is judged by its age against the default lease: while fresh it may
    be a live gc's (a newer ckptkit's, say), so saves wait and gc is refused; once older than the lease, saves go
    ahead and gc takes it over. It never breaks a save or a gc with a parse error (a claimed lease longer than the
    default is cut to the default)."""
    from ckptkit import storage

    repo = Repository(repo_url)
    repo.fs.makedirs(repo.root, exist_ok=True)
    # The parsing is the same on every store; S3 (which cannot be back-dated: each case waits) shows the judgement.
    for i, content in enumerate(GARBAGE if not repo.s3 else [b"[]", b"null", b"42", b"[" * 5000]):
        monkeypatch.setattr(storage.repository, "LOCK_STALE_AFTER", 120.0)
        repo.fs.pipe_file(repo.root + "/gc.lock", content)
        assert repo._gc_lock_held(), content
        with pytest.raises(RepositoryBusyError):
            gc(repo_url)
        with pytest.raises(RepositoryBusyError), repo.pending([], wait=0.05):
            pytest.fail("a save went ahead under a fresh lock")
        # The default lease, short here; the lock as if nobody had renewed it for longer than that.
        monkeypatch.setattr(storage.repository, "LOCK_STALE_AFTER", 1.0)
        monkeypatch.setattr(storage.repository, "_MTIME_RESOLUTION", 0.0)
        _age(repo, "gc.lock", 1.1)
        assert not repo._gc_lock_held(), content
        ckptkit.save(repo_url, {"model": torch.nn.Linear(2, 2)}, f"s{i}", rng=False)
        gc(repo_url)  # takes it over and removes it
        assert not repo.fs.exists(repo.root + "/gc.lock"), content
    assert all(r.ok for r in ckptkit.verify(repo_url))


def test_a_directory_under_the_lock_name_never_breaks_saves_and_gc_says_what_to_do(tmp_path: Path) -> None:
    """A directory where gc.lock should be (an adversarial probe): saves are judged by its age like any unreadable
    lock, and gc, which cannot remove it, is refused with a typed error saying what to do (it used to leak a bare
    IsADirectoryError)."""
    url = str(tmp_path / "repo")
    ckptkit.save(url, {"model": torch.nn.Linear(3, 3)}, "a", rng=False)
    lock = tmp_path / "repo" / "gc.lock"
    lock.mkdir()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    start = time.monotonic()
    ckptkit.save(url, {"model": torch.nn.Linear(3, 3)}, "b", rng=False)
    assert time.monotonic() - start < 10
    with pytest.raises(RepositoryBusyError, match=r"gc\.lock is stale .* remove it by hand"):
        gc(url)
    lock.rmdir()
    gc(url)
    assert Repository(url).list() == ["a", "b"] and all(r.ok for r in ckptkit.verify(url))


def test_a_gc_on_the_destination_during_a_copy_never_leaves_the_copied_checkpoint_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy announces every object the copied manifests reference before it checks which the destination has
    (as a save does), so a gc there just before cannot delete an object the copy then counts as present."""
    from ckptkit.engine.gc import collect_garbage
    from ckptkit.history.copy import copy

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    model = torch.nn.Linear(64, 64)
    ckptkit.save(src, {"model": model}, "a", rng=False)
    ckptkit.save(dst, {"model": model}, "old", rng=False)  # the same objects, already in the destination...
    Repository(dst).delete("old")  # ...and now garbage there
    original = Repository.pending
    removed = []

    def gc_first(self: Repository, hashes: Any, *args: Any, **kwargs: Any) -> Any:
        if self.root.endswith("dst") and not removed:
            removed.append(collect_garbage(Repository(dst)).objects_removed)  # another process's gc
        return original(self, hashes, *args, **kwargs)

    monkeypatch.setattr(Repository, "pending", gc_first)
    report = copy(src, dst, ["a"])
    assert removed and removed[0] >= 1  # the gc did delete the garbage copies...
    assert report.checkpoints == ["a"] and report.objects_copied >= 1  # ...so the copy sent them again
    assert all(r.ok for r in ckptkit.verify(dst))
    fresh = torch.nn.Linear(64, 64)
    ckptkit.restore(dst, {"model": fresh}, "a", rng=False)
    assert torch.equal(fresh.weight, model.weight)
