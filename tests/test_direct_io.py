"""Large objects of async saves on local disk (of every save with ``direct_io=True``) are written with
``O_DIRECT``: they bypass the page cache (what a user sees with ``fincore``: no page of a saved object stays
cached, so a checkpoint does not evict the dataset's pages), they read back bit-exactly whatever their length
(the last partial block goes through the page cache), and a filesystem that refuses direct writes gets buffered
ones without the save noticing. Synchronous saves stay buffered by default."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit.errors import InvalidArgumentError
from ckptkit.storage import Repository
from ckptkit.storage import local as local_backend
from ckptkit.storage.local import DIRECT_BUFFER, DIRECT_FROM

pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("fincore") is None,
                                reason="O_DIRECT and fincore(1) (util-linux) are Linux's")  # fmt: skip
PAGE = 4096


def _state() -> dict[str, torch.nn.Module]:
    """An object per component, of awkward lengths: below the direct threshold, one buffer and a bit, several
    buffers and a tail."""
    torch.manual_seed(0)
    return {
        "small": torch.nn.Linear(256, 256),  # 256 KiB: buffered
        "mid": torch.nn.Linear(1024, DIRECT_BUFFER // 4096 + 1),  # one buffer and a bit
        "big": torch.nn.Linear(1000, 5001),  # ~20 MB: two whole buffers, then a partial one with a tail
    }


def _objects(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (root / "objects").rglob("*") if p.is_file()}


def _resident(path: Path) -> int:
    """Bytes of the file held in the page cache, as fincore(1) reports them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True,
                         text=True, check=True, timeout=30)  # fmt: skip
    return int(out.stdout.split()[0])


def _path(root: Path, h: str) -> Path:
    return root / "objects" / h[:2] / h


def _restores_exactly(url: str, model: dict[str, torch.nn.Module], name: str) -> None:
    fresh = _state()
    for m in fresh.values():
        for p in m.parameters():
            p.data.zero_()
    ckptkit.restore(url, fresh, name, rng=False)
    for c, m in model.items():
        for (k, a), b in zip(m.state_dict().items(), fresh[c].state_dict().values(), strict=True):
            assert torch.equal(a, b), (c, k)
    assert all(r.ok for r in ckptkit.verify(url))


def test_large_objects_skip_the_page_cache_and_restore_bit_exactly(tmp_path: Path) -> None:
    model = _state()
    repo = Repository(tmp_path / "direct", direct_io=True)
    ckptkit.save(repo, model, "one", rng=False)
    assert repo.backend.direct_supported, "the filesystem under tmp_path refused O_DIRECT"  # ext4 in CI
    sizes = _objects(tmp_path / "direct")
    large = {h: n for h, n in sizes.items() if n >= DIRECT_FROM}
    assert len(large) >= 2 and any(n % PAGE for n in large.values()) and len(large) < len(sizes), sizes
    for h in large:  # the tail's page, at most, is cached
        assert _resident(_path(tmp_path / "direct", h)) <= PAGE, h
    _restores_exactly(str(tmp_path / "direct"), model, "one")
    assert not list((tmp_path / "direct").rglob(".tmp-*"))

    # The same save, buffered (direct_io=False, and a synchronous save by default): the same objects (names are
    # content hashes), all cached after the write.
    for name, option in (("buffered", False), ("default", None)):
        ckptkit.save(Repository(tmp_path / name, direct_io=option), model, "one", rng=False)
        assert _objects(tmp_path / name) == sizes
        for h, n in large.items():
            assert _resident(_path(tmp_path / name, h)) >= n - PAGE, (name, h)
            assert _path(tmp_path / name, h).read_bytes() == _path(tmp_path / "direct", h).read_bytes()


def test_a_filesystem_that_refuses_direct_writes_gets_buffered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems refuse O_DIRECT when it is set (EINVAL from fcntl), others only at the first write
    (blocks larger than a page): both get a correct object written through the page cache, and later objects go
    straight there."""
    model = _state()
    real_fcntl = fcntl.fcntl

    def refusing_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fcntl(fd, cmd, arg)

    real_pwrite = os.pwrite
    calls = {"refused": 0}

    def refusing_pwrite(fd: int, data: memoryview, offset: int) -> int:
        if real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls["refused"] += 1
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    for where, patch in (("at-fcntl", ("fcntl", refusing_fcntl)), ("at-write", ("pwrite", refusing_pwrite))):
        with monkeypatch.context() as m:
            if patch[0] == "fcntl":
                m.setattr(local_backend.fcntl, "fcntl", refusing_fcntl)
            else:
                m.setattr(os, "pwrite", refusing_pwrite)
            repo = Repository(tmp_path / where, direct_io=True)
            ckptkit.save(repo, model, "one", rng=False)
            assert not repo.backend.direct_supported, where
        for h, n in _objects(tmp_path / where).items():
            if n >= DIRECT_FROM:
                assert _resident(_path(tmp_path / where, h)) >= n - PAGE, (where, h)
        _restores_exactly(str(tmp_path / where), model, "one")
        assert not list((tmp_path / where).rglob(".tmp-*"))
    assert calls["refused"] >= 1  # once: the backend stops trying after the first refusal


def test_direct_io_is_an_option_of_local_repositories_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="direct_io applies to repositories on local disk"):
        Repository("memory://direct-io-option", direct_io=True)
    with pytest.raises(InvalidArgumentError, match="direct_io must be True, False or None"):
        Repository(tmp_path, direct_io="yes")  # type: ignore[arg-type]
    assert [Repository(tmp_path, direct_io=v).backend.direct_io for v in (None, True, False)] == [None, True, False]


@pytest.mark.parametrize("writer", ["thread", "process"])
@pytest.mark.parametrize("option", [None, False])
def test_async_saves_write_directly_unless_the_repository_says_not_to(
    tmp_path: Path, writer: str, option: bool | None
) -> None:
    """An async save's writer (a thread, or a child process that opens the repository itself and takes the
    parent's ``direct_io`` with it) writes directly by default; ``direct_io=False`` keeps it buffered."""
    model = _state()
    direct = option is None
    repo = Repository(tmp_path / "repo", direct_io=option)
    mgr = ckptkit.CheckpointManager(repo, model, async_save=True, writer=writer, rng=False)
    mgr.save(1, force=True)
    name = mgr.wait().name
    mgr.close()
    large = {h: n for h, n in _objects(tmp_path / "repo").items() if n >= DIRECT_FROM}
    assert large
    for h, n in large.items():
        resident = _resident(_path(tmp_path / "repo", h))
        assert resident <= PAGE if direct else resident >= n - PAGE, (h, resident)
    _restores_exactly(str(tmp_path / "repo"), model, name)
