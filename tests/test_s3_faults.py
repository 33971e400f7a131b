"""The S3 backend on a misbehaving network: the real Ceph RADOS Gateway behind a fault-injecting proxy on loopback.

tests/faultproxy.py forwards one request and then its response at a time, and rules make it lose the answer to a
given request (after the server acted on it), stall it, cut a response body short, answer in the server's
place, or refuse connections. s3fs is pointed at the proxy (``endpoint_url``) with botocore's retries on, as a
training job's client would be, so what is tested is the whole stack: botocore retrying, s3fs translating, and
the backend deciding what the outcome was.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

import ckptkit
from ckptkit.errors import CheckpointExistsError, StorageError, StorageTimeoutError
from ckptkit.storage import Repository

sys.path.insert(0, str(Path(__file__).parent))
from faultproxy import FaultProxy, Rule

MIB = 1 << 20
TIMEOUT = 2.0  # the repositories' deadline here: a stall fails in seconds
RETRIES = {"max_attempts": 3, "mode": "standard"}


@pytest.fixture
def proxy(s3: Any) -> Iterator[FaultProxy]:
    rgw = urlparse(s3.server.endpoint)
    with FaultProxy((rgw.hostname or "127.0.0.1", rgw.port or 80), lifetime=90, io_timeout=20) as p:
        yield p


def _through(proxy: FaultProxy, s3: Any, url: str, s3fs_retries: int | None = None, attempts: int = 3,
             **kwargs: Any) -> Repository:  # fmt: skip
    """A repository on ``url`` whose client goes through the proxy (an s3fs instance of its own), botocore
    making ``attempts`` attempts per call; with ``s3fs_retries``, s3fs makes that many calls in all (5 by
    default: a fault on every attempt then takes 15 attempts and their backoffs to give up)."""
    options = {**s3.storage_options(), "skip_instance_cache": True, "client_kwargs": {"endpoint_url": proxy.endpoint},
               "config_kwargs": {"retries": {**RETRIES, "max_attempts": attempts}}}  # fmt: skip
    repo = Repository(url, options, **kwargs)
    if s3fs_retries is not None:
        repo.fs.retries = s3fs_retries
    # The repository's settings (repository.json, one GET per Repository) are read now, before a test installs
    # its faults: each fault then meets the request it is written for, and the 2 s deadlines time only those.
    # The first request of a new client also builds it (botocore's models: seconds on a loaded 2-core machine),
    # so it gets a few tries.
    for attempt in range(4):
        try:
            assert repo.codec is None
            break
        except StorageTimeoutError:
            if attempt == 3:
                raise
    return repo


def _direct(url: str) -> Repository:
    """The same repository, straight to the server (the truth about what is stored)."""
    return Repository(url, {"skip_instance_cache": True})


def _uploads(repo: Repository) -> list[dict[str, Any]]:
    bucket, key, _ = repo.fs.split_path(repo.root)
    return list(repo.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/").get("Uploads", []))


def _causes(err: BaseException) -> list[str]:
    out = []
    seen: BaseException | None = err.__cause__
    while seen is not None and len(out) < 10:
        out.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return out


@pytest.fixture
def url(s3: Any) -> Iterator[str]:
    u = s3.fresh_url()
    yield u
    with contextlib.suppress(FileNotFoundError):
        _direct(u).fs.rm(u.removeprefix("s3://"), recursive=True)  # the OSD keeps objects in memory


def _state(n: int = 16) -> dict[str, Any]:
    torch.manual_seed(n)
    return {"model": torch.nn.Linear(n, n)}


# --- 1. lost answers: a success must be reported as one ----------------------------------------------------------


def test_a_commit_whose_answer_was_lost_is_reported_as_committed(s3: Any, proxy: FaultProxy, url: str) -> None:
    """The manifest PUT reaches the server and commits; its answer is lost; botocore retries the conditional
    PUT and gets 412. The stored manifest is ours, byte for byte: the save succeeded and must say so."""
    repo = _through(proxy, s3, url)
    proxy.add(Rule("drop_response", method="PUT", path="/checkpoints/a.json"))
    state = _state()
    m = ckptkit.save(repo, state, "a", rng=False)
    puts = [s.status for s in proxy.requests("PUT", "/checkpoints/a.json")]
    assert puts == [200, 412], f"the scenario did not happen as planned: {puts}"
    assert [s.action for s in proxy.fired()] == ["drop_response"]
    direct = _direct(url)
    assert direct.list() == ["a"]
    fresh = {"model": torch.nn.Linear(16, 16)}
    assert ckptkit.restore(direct, fresh, "a", rng=False).manifest.id == m.id
    assert torch.equal(fresh["model"].weight, state["model"].weight)
    assert all(r.ok for r in ckptkit.verify(direct))


def test_a_conflicting_commit_is_still_refused_and_an_identical_one_accepted(
    s3: Any, proxy: FaultProxy, url: str
) -> None:
    """The 412 check reads the stored object back: another writer's manifest still wins (and is never replaced);
    only our own bytes count as our commit. The HEAD before the PUT is answered 404 by the proxy: the other
    writer committed between our check and our PUT."""
    _direct(url).commit("a", b'{"first": 1}')
    repo = _through(proxy, s3, url)
    proxy.add(Rule("respond", method="HEAD", path="/checkpoints/a.json", status=404, count=2))
    with pytest.raises(CheckpointExistsError):
        repo.commit("a", b'{"second": 2}')
    assert [s.status for s in proxy.requests("PUT", "/checkpoints/a.json")] == [412]
    assert _direct(url).read_manifest("a") == b'{"first": 1}'
    repo.commit("a", b'{"first": 1}')  # the same bytes: a retried commit of ours
    assert [s.status for s in proxy.requests("PUT", "/checkpoints/a.json")] == [412, 412]
    with pytest.raises(CheckpointExistsError):  # without the proxy's lie the existence check refuses at once
        repo.commit("a", b'{"first": 1}')


def test_a_lost_answer_to_completing_a_multipart_upload_is_a_success(s3: Any, proxy: FaultProxy, url: str) -> None:
    """CompleteMultipartUpload completes, its answer is lost, the retry finds no such upload (404, as S3 answers;
    Ceph answers a repeated completion 200, so the proxy answers the retry in its place): the object is there
    with the ETag its parts make, so the save goes on. An upload that truly vanished is an error."""
    repo = _through(proxy, s3, url, part_size=5 * MIB)
    proxy.add(Rule("drop_response", method="POST", query="uploadId=", nth=1))
    proxy.add(Rule("respond", method="POST", query="uploadId=", nth=2, status=404))
    big = {"t": {"big": torch.arange(3 * MIB, dtype=torch.float32)}}  # 12 MiB: three parts
    m = ckptkit.save(repo, big, "a", rng=False, object_size=64 * MIB)
    completes = [(s.status, s.action) for s in proxy.requests("POST") if "uploadId=" in s.target]
    assert completes == [(200, "drop_response"), (404, "respond")], completes
    direct = _direct(url)
    assert direct.list() == ["a"] and _uploads(direct) == []
    out = ckptkit.restore(direct, {}, "a", rng=False).values["t"]["big"]
    assert torch.equal(out, big["t"]["big"]) and len(m.objects) == 1

    proxy.clear()
    proxy.add(Rule("respond", method="POST", query="uploadId=", status=404, count=None))
    other = {"t": {"big": torch.arange(3 * MIB, dtype=torch.float32) + 1}}
    with pytest.raises(StorageError, match="vanished"):
        ckptkit.save(repo, other, "b", rng=False, object_size=64 * MIB)
    assert direct.list() == ["a"] and _uploads(direct) == []


# --- 2. stalls: a deadline, a typed error, nothing committed -------------------------------------------------------


def test_a_stalled_part_upload_fails_by_the_deadline_and_leaves_nothing(s3: Any, proxy: FaultProxy, url: str) -> None:
    repo = _through(proxy, s3, url, part_size=5 * MIB, timeout=TIMEOUT)
    proxy.add(Rule("stall_request", method="PUT", query="partNumber=2", stall_s=60))
    big = {"t": {"big": torch.arange(3 * MIB, dtype=torch.float32)}}
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError) as err:
        ckptkit.save(repo, big, "a", rng=False, object_size=64 * MIB)
    took = time.monotonic() - start
    deadline = TIMEOUT + 5  # a 5 MiB part: the timeout plus a second per MiB
    assert took < deadline + 8, f"failed after {took:.1f}s, deadline {deadline}s"
    assert isinstance(err.value, TimeoutError) and isinstance(err.value, OSError)
    msg = str(err.value)
    assert url in msg and "saving (part 2 of 3)" in msg and "objects/" in msg, msg
    direct = _direct(url)
    assert direct.list() == [] and direct.list_objects() == {}
    assert _uploads(direct) == [], "the stalled save left its multipart upload open"
    print(f"\nstalled part: StorageTimeoutError after {took:.1f}s (deadline {deadline:.0f}s): {msg[:160]}")


def test_a_stalled_commit_fails_by_the_deadline_and_commits_nothing(s3: Any, proxy: FaultProxy, url: str) -> None:
    repo = _through(proxy, s3, url, timeout=TIMEOUT)
    proxy.add(Rule("stall_request", method="PUT", path="/checkpoints/a.json", stall_s=60))
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError, match=r"committing checkpoints/a\.json") as err:
        ckptkit.save(repo, _state(), "a", rng=False)
    took = time.monotonic() - start
    assert took < TIMEOUT + 8, took
    assert url in str(err.value)
    assert _direct(url).list() == []
    # The endpoint recovers: the next save commits.
    proxy.clear()
    ckptkit.save(repo, _state(), "b", rng=False)
    assert _direct(url).list() == ["b"]


def test_a_stalled_restore_fails_by_the_deadline(s3: Any, proxy: FaultProxy, url: str) -> None:
    ckptkit.save(_direct(url), _state(), "a", rng=False)
    repo = _through(proxy, s3, url, timeout=TIMEOUT)
    proxy.add(Rule("stall_response", method="GET", path="/objects/", stall_s=60, count=None))
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError, match="reading objects/") as err:
        ckptkit.restore(repo, _state(), "a", rng=False)
    took = time.monotonic() - start
    assert took < TIMEOUT + 8, took
    assert url in str(err.value)
    proxy.clear()
    proxy.add(Rule("stall_request", method="GET", query="list-type=2", stall_s=60, count=None))
    with pytest.raises(StorageTimeoutError, match="listing checkpoints/"):
        repo.list()


def test_a_fully_stalled_endpoint_fails_saves_and_restores_within_a_few_deadlines(
    s3: Any, proxy: FaultProxy, url: str
) -> None:
    """Every request stalls (the endpoint accepts connections and never answers): a save fails after its first
    request's deadline plus its clean-up's (the pending record's DELETE gets the same deadline), a restore
    after one; each names the repository."""
    ckptkit.save(_direct(url), _state(), "a", rng=False)
    repo = _through(proxy, s3, url, timeout=TIMEOUT)
    proxy.add(Rule("stall_request", stall_s=60, count=None))
    for call in (lambda: ckptkit.save(repo, _state(), "b", rng=False),
                 lambda: ckptkit.restore(repo, _state(), "a", rng=False)):  # fmt: skip
        start = time.monotonic()
        with pytest.raises(StorageTimeoutError) as err:
            call()
        took = time.monotonic() - start
        assert took < 3 * TIMEOUT + 8, took
        assert url in str(err.value)
    assert _direct(url).list() == ["a"]


# --- 3. library errors become typed errors -------------------------------------------------------------------------


def test_a_get_cut_short_is_resumed_from_where_it_broke(s3: Any, proxy: FaultProxy, url: str) -> None:
    state = _state(64)
    m = ckptkit.save(_direct(url), state, "a", rng=False)
    ((h, info),) = m.objects.items()
    repo = _through(proxy, s3, url)
    proxy.add(Rule("truncate_response", method="GET", path=f"/objects/{h[:2]}/{h}", keep=1000))
    fresh = {"model": torch.nn.Linear(64, 64)}
    ckptkit.restore(repo, fresh, "a", rng=False)
    assert torch.equal(fresh["model"].weight, state["model"].weight)
    gets = proxy.requests("GET", f"/objects/{h[:2]}/{h}")
    assert len(gets) == 2 and gets[0].action == "truncate_response", gets
    assert info.size > 1000


def test_a_get_cut_short_every_time_is_a_storage_error(s3: Any, proxy: FaultProxy, url: str) -> None:
    m = ckptkit.save(_direct(url), _state(64), "a", rng=False)
    ((h, _),) = m.objects.items()
    repo = _through(proxy, s3, url)
    proxy.add(Rule("truncate_response", method="GET", path="/objects/", keep=100, count=None))
    with pytest.raises(StorageError) as err:
        ckptkit.restore(repo, _state(64), "a", rng=False)
    assert type(err.value) is StorageError
    msg = str(err.value)
    assert err.value.key == f"objects/{h[:2]}/{h}" and err.value.url == url, msg
    assert url in msg and h in msg and "cut short" in msg, msg
    assert "ClientPayloadError" in _causes(err.value) or "IncompleteReadError" in _causes(err.value), _causes(err.value)


def test_refused_connections_are_a_storage_error(s3: Any, proxy: FaultProxy, url: str) -> None:
    ckptkit.save(_direct(url), _state(), "a", rng=False)
    repo = _through(proxy, s3, url, s3fs_retries=1, attempts=2)
    assert repo.list() == ["a"]
    proxy.refuse_connections()
    with pytest.raises(StorageError) as err:
        repo.list()
    assert isinstance(err.value, OSError) and url in str(err.value) and "listing" in str(err.value)
    assert "EndpointConnectionError" in _causes(err.value), _causes(err.value)
    with pytest.raises(StorageError) as err:
        ckptkit.restore(repo, _state(), "a", rng=False)
    assert "EndpointConnectionError" in _causes(err.value), _causes(err.value)
    with pytest.raises(StorageError) as err:
        ckptkit.save(repo, _state(), "b", rng=False)
    assert "EndpointConnectionError" in _causes(err.value), _causes(err.value)
    proxy.accept_connections()  # and back
    assert repo.list() == ["a"]


def test_a_cut_connection_before_any_answer_is_retried_or_typed(s3: Any, proxy: FaultProxy, url: str) -> None:
    """Connections closed before the request reaches the server: botocore retries (a transient fault leaves no
    trace); when every attempt is cut, the error is typed."""
    repo = _through(proxy, s3, url, s3fs_retries=1, attempts=2)
    proxy.add(Rule("drop_request", method="PUT", path="/objects/"))
    ckptkit.save(repo, _state(), "a", rng=False)
    assert _direct(url).list() == ["a"]
    proxy.add(Rule("drop_request", method="PUT", path="/objects/", count=None))
    with pytest.raises(StorageError, match="saving objects/") as err:
        ckptkit.save(repo, _state(32), "b", rng=False)
    assert "ConnectionClosedError" in _causes(err.value), _causes(err.value)
    assert _direct(url).list() == ["a"]


def test_the_timeout_is_checked(s3: Any, tmp_path: Path, url: str) -> None:
    for bad in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="timeout"):
            Repository(url, timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply to S3"):
        Repository(str(tmp_path), timeout=5)
    assert Repository(url, timeout=5).backend.timeout == 5.0  # type: ignore[attr-defined]
    assert Repository(url).backend.timeout == 60.0  # type: ignore[attr-defined]


def test_an_object_larger_than_declared_is_refused_by_its_content_length(url: str) -> None:
    """What the bucket holds is untrusted too: an object under a hash whose size the manifest declares smaller is
    refused from the GET's Content-Length, before its body is read."""
    from ckptkit.errors import CorruptObjectError
    from ckptkit.hashing import hash_bytes

    repo = _direct(url)
    data = b"x" * 4096
    h = hash_bytes(data)
    repo.write_object(h, [memoryview(data)])
    with pytest.raises(CorruptObjectError, match="larger than expected"):
        repo.read_object(h, 100)
    assert bytes(repo.read_object(h, len(data))) == data
