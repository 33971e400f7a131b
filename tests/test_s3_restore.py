"""Restores from S3 with concurrent ranged GETs, against the real Ceph RADOS Gateway (and, where faults matter, the
fault-injecting proxy of tests/faultproxy.py): parts arrive in any order and are hashed in order as they arrive,
the restore is bit-exact, a damaged part is a CorruptObjectError naming the object, and a ranged GET cut short or
stalled is a typed error, never a short tensor.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

import ckptkit
from ckptkit.errors import CorruptObjectError, InvalidArgumentError, StorageError, StorageTimeoutError
from ckptkit.hashing import hash_bytes
from ckptkit.schema import Manifest
from ckptkit.storage import Repository

sys.path.insert(0, str(Path(__file__).parent))
from faultproxy import FaultProxy, Rule

MIB = 1 << 20
PART = MIB  # the smallest read part: a few MiB of state make a multi-part read
TIMEOUT = 2.0


@pytest.fixture
def proxy(s3: Any) -> Iterator[FaultProxy]:
    rgw = urlparse(s3.server.endpoint)
    with FaultProxy((rgw.hostname or "127.0.0.1", rgw.port or 80), lifetime=90, io_timeout=20) as p:
        yield p


@pytest.fixture
def url(s3: Any) -> Iterator[str]:
    u = s3.fresh_url()
    yield u
    with contextlib.suppress(FileNotFoundError):
        _direct(u).fs.rm(u.removeprefix("s3://"), recursive=True)  # the OSD keeps objects in memory


def _direct(url: str, **kwargs: Any) -> Repository:
    return Repository(url, {"skip_instance_cache": True}, **kwargs)


def _through(proxy: FaultProxy, s3: Any, url: str, **kwargs: Any) -> Repository:
    """The repository with its client going through the proxy (botocore retries on, as in tests/test_s3_faults)."""
    options = {**s3.storage_options(), "skip_instance_cache": True, "client_kwargs": {"endpoint_url": proxy.endpoint},
               "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}}}  # fmt: skip
    return Repository(url, options, read_part_size=PART, read_concurrency=3, **kwargs)


def _state(seed: int = 0) -> dict[str, Any]:
    """One object of about 3.6 MiB (odd-sized tensors): four parts of 1 MiB, the last one uneven."""
    torch.manual_seed(seed)
    return {"model": torch.nn.Sequential(torch.nn.Linear(700, 1300), torch.nn.Linear(1300, 7, dtype=torch.float64))}


def _object(m: Manifest) -> tuple[str, int]:
    ((h, info),) = m.objects.items()
    return h, info.size


def test_a_multi_part_restore_is_bit_exact(s3: Any, proxy: FaultProxy, url: str) -> None:
    state = _state()
    m = ckptkit.save(_direct(url), state, "a", rng=False)
    h, size = _object(m)
    parts = math.ceil(size / PART)
    assert parts >= 3 and size % PART, (size, parts)  # larger than a part, and an uneven last part
    repo = _through(proxy, s3, url)
    fresh = _state(1)
    ckptkit.restore(repo, fresh, "a", rng=False)
    for key, t in state["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[key], t), key
    gets = proxy.requests("GET", f"/objects/{h[:2]}/{h}")
    assert len(gets) == parts and all(g.status == 206 for g in gets), gets  # one ranged GET per part
    # The backend's digest is the hash of the bytes it returns, computed while the parts arrived.
    view, digest = repo.backend.get(f"objects/{h[:2]}/{h}", size)
    assert digest == h == hash_bytes(view) and len(view) == size
    # An empty object (no byte 0 to range over) reads as empty, hashed.
    repo.fs.pipe(repo.root + "/misc/empty", b"")
    assert repo.backend.get("misc/empty") == (memoryview(b""), hash_bytes(b""))


def test_a_flipped_byte_in_one_part_is_a_corrupt_object(url: str) -> None:
    repo = _direct(url, read_part_size=PART, read_concurrency=4)
    m = ckptkit.save(repo, _state(), "a", rng=False)
    h, _ = _object(m)
    path = repo.object_path(h)
    stored = bytearray(repo.fs.cat_file(path))
    stored[2 * PART + 12345] ^= 0x01  # in the third part
    repo.fs.pipe(path, bytes(stored))
    fresh = _state(1)
    before = {k: v.clone() for k, v in fresh["model"].state_dict().items()}
    with pytest.raises(CorruptObjectError) as err:
        ckptkit.restore(repo, fresh, "a", rng=False)
    assert err.value.path == path and h in str(err.value), str(err.value)
    assert all(torch.equal(before[k], v) for k, v in fresh["model"].state_dict().items()), "loaded a damaged state"


def test_a_ranged_get_cut_short_once_is_resumed_and_every_time_is_a_storage_error(
    s3: Any, proxy: FaultProxy, url: str
) -> None:
    state = _state()
    m = ckptkit.save(_direct(url), state, "a", rng=False)
    h, size = _object(m)
    parts = math.ceil(size / PART)
    repo = _through(proxy, s3, url)
    where = f"/objects/{h[:2]}/{h}"
    # Once: a part other than the first (the second GET) is cut after 1000 bytes and resumed from there.
    proxy.add(Rule("truncate_response", method="GET", path=where, nth=2, keep=1000))
    fresh = _state(1)
    ckptkit.restore(repo, fresh, "a", rng=False)
    assert torch.equal(fresh["model"][0].weight, state["model"][0].weight)
    gets = proxy.requests("GET", where)
    assert len(gets) == parts + 1 and [g.action for g in gets].count("truncate_response") == 1, gets
    # Every time, after the first part: a typed error naming the object and the part, and nothing loaded.
    proxy.clear()
    proxy.add(Rule("truncate_response", method="GET", path=where, nth=2, keep=1000, count=None))
    fresh = _state(1)
    before = fresh["model"][0].weight.detach().clone()
    with pytest.raises(StorageError) as err:
        ckptkit.restore(repo, fresh, "a", rng=False)
    msg = str(err.value)
    assert type(err.value) is StorageError and err.value.key == f"objects/{h[:2]}/{h}", msg
    assert url in msg and "cut short" in msg and "part " in msg and f" of {parts})" in msg, msg
    assert torch.equal(fresh["model"][0].weight, before)


def test_a_stalled_ranged_get_fails_by_its_deadline(s3: Any, proxy: FaultProxy, url: str) -> None:
    m = ckptkit.save(_direct(url), _state(), "a", rng=False)
    h, _ = _object(m)
    repo = _through(proxy, s3, url, timeout=TIMEOUT)
    proxy.add(Rule("stall_response", method="GET", path=f"/objects/{h[:2]}/{h}", nth=3, stall_s=60))
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError) as err:
        ckptkit.restore(repo, _state(1), "a", rng=False)
    took = time.monotonic() - start
    deadline = TIMEOUT + PART / MIB  # a part's deadline: the timeout plus a second per MiB
    assert took < deadline + 8, f"failed after {took:.1f}s, deadline {deadline}s"
    assert url in str(err.value) and "reading (part " in str(err.value), str(err.value)


def test_the_read_options_are_checked(url: str, tmp_path: Path) -> None:
    for bad in (0, MIB - 1, (5 << 30) + 1, True, 1.5 * MIB, "64"):
        with pytest.raises(InvalidArgumentError, match="read_part_size"):
            Repository(url, read_part_size=bad)  # type: ignore[arg-type]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(InvalidArgumentError, match="read_concurrency"):
            Repository(url, read_concurrency=bad)  # type: ignore[arg-type]
    for local in (str(tmp_path), "memory://read-options"):
        with pytest.raises(InvalidArgumentError, match="apply to S3"):
            Repository(local, read_part_size=8 * MIB)
        with pytest.raises(InvalidArgumentError, match="apply to S3"):
            Repository(local, read_concurrency=2)
    backend: Any = Repository(url, read_part_size=16 * MIB, read_concurrency=3).backend
    assert (backend.read_part_size, backend.read_concurrency) == (16 * MIB, 3)
    backend = Repository(url).backend
    assert (backend.read_part_size, backend.read_concurrency) == (64 * MIB, 8)
