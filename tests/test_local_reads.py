"""Reads of hostile local repositories: what a repository holds is untrusted, so a read opens regular files only
and never reads more than the caller expects.

Each case would hang, exhaust memory or raise a raw builtin error if the read path trusted the file system:
an object that is a FIFO (``open`` blocks until a writer comes), a manifest that is a link to ``/dev/zero``
(never ends), a 3 GiB sparse file where the manifest declares a few KiB, a directory where an object should be.
The risky reads run under a watchdog (a thread that is unblocked and failed after a few seconds) or in a child
process with a timeout and an address-space limit, so that a regression fails fast instead of hanging CI or
eating the machine's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

import ckptkit
from ckptkit.errors import CorruptObjectError, ManifestError
from ckptkit.storage import Repository

T = TypeVar("T")
WATCHDOG_S = 10.0
CHILD_TIMEOUT_S = 60.0
CHILD_MEMORY = 1 << 30  # address space of a child read: a 3 GiB buffer, or /dev/zero read to the end, cannot fit
BIG = 3 << 30

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, /dev/zero and sparse files: POSIX")


def _repo(tmp_path: Path) -> tuple[str, Repository, str, int]:
    """A local repository with one committed checkpoint ``a`` of one object: (url, repo, hash, declared size)."""
    url = str(tmp_path / "repo")
    m = ckptkit.save(url, {"model": torch.nn.Linear(8, 8)}, "a", rng=False)
    ((h, info),) = m.objects.items()
    return url, Repository(url), h, info.size


def _replace(path: str, make: Callable[[str], None]) -> None:
    os.unlink(path)
    make(path)


def _within(seconds: float, fn: Callable[[], T], unblock: Callable[[], None] | None = None) -> T:
    """``fn()`` on a thread; fail if it has not returned after ``seconds`` (calling ``unblock`` first, so that
    the stuck thread can end)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if unblock is not None:
            unblock()
        t.join(5)
        pytest.fail(f"the read did not finish within {seconds}s: it blocked on what the repository holds")
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


def _unblock_fifo(path: str) -> Callable[[], None]:
    """Open the FIFO for writing and close it: a reader blocked in open() gets its writer, then end-of-file."""

    def unblock() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        os.close(fd)

    return unblock


def _in_child(url: str, code: str) -> dict[str, Any]:
    """Run ``code`` (with ``r``, a Repository of ``url``) in a fresh process with little address space and a
    timeout; what it raised, by class names and message, or ``{"ok": ..., "value": ...}``."""
    script = f"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY}))
from ckptkit.storage import Repository
r = Repository(sys.argv[1])
t0 = time.monotonic()
try:
    value = {code}
    out = {{"ok": True, "value": len(value) if hasattr(value, "__len__") else repr(value)}}
except BaseException as e:
    out = {{"error": [c.__name__ for c in type(e).__mro__], "message": str(e)}}
out["seconds"] = time.monotonic() - t0
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip(), f"the child failed: {proc.stdout}\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _problems(url: str) -> list[str]:
    return [p for r in ckptkit.verify(url) for p in r.problems]


# --- FIFOs -------------------------------------------------------------------------------------------------------


def test_an_object_that_is_a_fifo_is_refused_at_once_and_verify_reports_it(tmp_path: Path) -> None:
    url, repo, h, size = _repo(tmp_path)
    path = repo.object_path(h)
    _replace(path, os.mkfifo)
    unblock = _unblock_fifo(path)
    with pytest.raises(CorruptObjectError, match="FIFO"):
        _within(WATCHDOG_S, lambda: repo.read_object(h, size), unblock)
    with pytest.raises(CorruptObjectError, match="FIFO"):
        _within(WATCHDOG_S, lambda: repo.backend.get_range(f"objects/{h[:2]}/{h}", 0, 8), unblock)
    problems = _within(WATCHDOG_S, lambda: _problems(url), unblock)
    assert len(problems) == 1 and "FIFO" in problems[0] and path in problems[0], problems
    with pytest.raises(CorruptObjectError, match="FIFO"):
        _within(WATCHDOG_S, lambda: ckptkit.restore(url, {"model": torch.nn.Linear(8, 8)}, "a", rng=False), unblock)


def test_a_manifest_that_is_a_fifo_is_a_manifest_error_not_a_hang(tmp_path: Path) -> None:
    url, repo, _, _ = _repo(tmp_path)
    path = repo.manifest_path("a")
    _replace(path, os.mkfifo)
    unblock = _unblock_fifo(path)
    with pytest.raises(ManifestError, match="FIFO"):
        _within(WATCHDOG_S, lambda: repo.read_manifest("a"), unblock)
    reports = _within(WATCHDOG_S, lambda: ckptkit.verify(url, "a"), unblock)  # (listings show regular files only)
    assert len(reports[0].problems) == 1 and "FIFO" in reports[0].problems[0], reports


# --- devices and sizes (in a child process: a regression would read gigabytes) ------------------------------------


def test_a_manifest_or_object_linked_to_dev_zero_is_refused_unread(tmp_path: Path) -> None:
    url, repo, h, size = _repo(tmp_path)
    _replace(repo.manifest_path("a"), lambda p: os.symlink("/dev/zero", p))
    out = _in_child(url, 'r.read_manifest("a")')
    assert "ManifestError" in out.get("error", []), out
    assert "character device" in out["message"] and out["seconds"] < 5, out
    _replace(repo.object_path(h), lambda p: os.symlink("/dev/zero", p))
    out = _in_child(url, f"r.read_object({h!r}, {size})")
    assert "CorruptObjectError" in out.get("error", []), out
    assert "character device" in out["message"] and out["seconds"] < 5, out
    out = _in_child(url, f"r.read_object({h!r})")  # no declared size: still refused, by its type
    assert "CorruptObjectError" in out.get("error", []), out


def test_a_file_far_larger_than_declared_is_refused_before_reading(tmp_path: Path) -> None:
    url, repo, h, size = _repo(tmp_path)
    assert size < 64 << 10  # "a few KiB"
    for path in (repo.object_path(h), repo.manifest_path("a")):
        with open(path, "r+b") as f:
            f.truncate(BIG)  # sparse: costs no disk
    out = _in_child(url, f"r.read_object({h!r}, {size})")
    assert "CorruptObjectError" in out.get("error", []), out
    assert f"expected {size} bytes" in out["message"] and f"found {BIG} bytes" in out["message"], out
    assert "larger than expected; not read" in out["message"], out
    assert out["seconds"] < 2, out
    out = _in_child(url, 'r.read_manifest("a")')
    assert "ManifestError" in out.get("error", []), out
    assert f"found {BIG} bytes" in out["message"] and out["seconds"] < 2, out
    # A file only one byte longer than declared is refused the same way (and one shorter still reads, to be
    # reported by the size check).
    with open(repo.object_path(h), "r+b") as f:
        f.truncate(size + 1)
    with pytest.raises(CorruptObjectError, match="larger than expected"):
        repo.read_object(h, size)
    with open(repo.object_path(h), "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(CorruptObjectError, match="size differs"):
        repo.read_object(h, size)


# --- directories, links, odd paths -------------------------------------------------------------------------------


def test_a_directory_where_an_object_should_be_is_a_corrupt_object(tmp_path: Path) -> None:
    url, repo, h, size = _repo(tmp_path)
    path = repo.object_path(h)
    _replace(path, os.mkdir)
    with pytest.raises(CorruptObjectError, match="a directory") as err:
        repo.read_object(h, size)
    assert not isinstance(err.value, IsADirectoryError)
    problems = _problems(url)
    assert len(problems) == 1 and "a directory" in problems[0], problems
    with pytest.raises(CorruptObjectError, match="a directory"):
        ckptkit.restore(url, {"model": torch.nn.Linear(8, 8)}, "a", rng=False)
    os.rmdir(path)  # and a manifest that is a directory
    _replace(repo.manifest_path("a"), os.mkdir)
    with pytest.raises(ManifestError, match="a directory"):
        repo.read_manifest("a")


def test_a_file_where_an_objects_folder_should_be_is_a_corrupt_object(tmp_path: Path) -> None:
    _, repo, h, size = _repo(tmp_path)
    folder = os.path.dirname(repo.object_path(h))
    os.unlink(repo.object_path(h))
    os.rmdir(folder)
    Path(folder).write_bytes(b"not a folder")
    with pytest.raises(CorruptObjectError, match="not a directory"):
        repo.read_object(h, size)


def test_symlinks_are_followed_to_regular_files_only(tmp_path: Path) -> None:
    """The documented policy: a link is judged by what it resolves to (git-annex and DVC keep repositories as
    trees of links into a cache, so links to regular files must keep working); a link to a FIFO is refused,
    a dangling link is a missing object, a loop is a corrupt one."""
    url, repo, h, size = _repo(tmp_path)
    path = repo.object_path(h)
    cache = tmp_path / "cache" / h
    cache.parent.mkdir()
    os.replace(path, cache)
    os.symlink(cache, path)
    assert bytes(repo.read_object(h, size)) == cache.read_bytes()
    assert _problems(url) == []
    restored = torch.nn.Linear(8, 8)
    ckptkit.restore(url, {"model": restored}, "a", rng=False)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _replace(path, lambda p: os.symlink(fifo, p))
    with pytest.raises(CorruptObjectError, match="FIFO"):
        _within(WATCHDOG_S, lambda: repo.read_object(h, size), _unblock_fifo(str(fifo)))

    _replace(path, lambda p: os.symlink(tmp_path / "nowhere", p))
    with pytest.raises(FileNotFoundError):
        repo.read_object(h, size)
    assert "missing" in _problems(url)[0]

    _replace(path, lambda p: os.symlink(p, p))
    with pytest.raises(CorruptObjectError, match="loop"):
        repo.read_object(h, size)


def test_reading_a_good_object_is_still_one_hashed_pass(tmp_path: Path) -> None:
    """The checks cost a stat and an fstat: a 64 MiB object still reads at memory speed, hash-verified."""
    url = str(tmp_path / "repo")
    big = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    m = ckptkit.save(url, {"t": {"big": big}}, "a", rng=False, object_size=128 << 20)
    ((h, info),) = m.objects.items()
    repo = Repository(url)
    repo.read_object(h, info.size)  # warm the page cache
    start = time.perf_counter()
    buf = repo.read_object(h, info.size)
    took = time.perf_counter() - start
    assert len(buf) == info.size
    print(f"\n64 MiB object read and verified in {took * 1000:.0f} ms ({info.size / took / 1e9:.2f} GB/s)")
