"""S3-specific behaviour against a real S3 server (Ceph's RADOS Gateway on loopback, see tests/s3server.py).

The conformance suite (test_repository.py), the manager tests and the round trips already run on S3 through the
``repo_url`` fixture. This file adds what only S3 has: credentials passed as storage options, multipart uploads
(and their clean-up), conditional commits, fresh listings across clients, and SIGKILL crash trials of a process
saving to a bucket.

Run as ``python tests/test_s3.py URL`` it is the crash trials' worker (a fork server, see tests/forkserver.py):
it reads the endpoint from ``CKPTKIT_S3_ENDPOINT`` and the credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, as a training job on a cluster would.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.api import checkpoints, gc
from ckptkit.errors import CheckpointExistsError
from ckptkit.hashing import hash_bytes
from ckptkit.storage import Repository

sys.path.insert(0, str(Path(__file__).parent))
import forkserver

MIB = 1 << 20

# --- the crash worker (also imported by the test for build_model / expected_state) --------------------------------

LAYERS = 4
WIDTH = 576  # 4 x Linear(576, 576): 5 MiB of parameters, 10 MiB more of AdamW moments
OBJECT_SIZE = 12 * MIB
PART_SIZE = 5 * MIB  # objects above 5 MiB go up as multipart uploads: kills land inside them too
KEEP = 2
MAX_STEPS_PER_RUN = 200


def build_model() -> torch.nn.Sequential:
    return torch.nn.Sequential(*[torch.nn.utils.skip_init(torch.nn.Linear, WIDTH, WIDTH) for _ in range(LAYERS)])


@functools.cache
def _base(numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32).remainder_(1013.0).mul_(1e-3)


def expected_state(k: int, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters and AdamW state at step ``k``: a pure function of ``k``, different for every ``k``."""
    out: dict[str, dict[str, torch.Tensor]] = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for i, (name, p) in enumerate(model.named_parameters()):
        base = _base(p.numel())
        for which, key in enumerate(("param", "exp_avg", "exp_avg_sq")):
            out[key][name] = base.add(float(k) + 0.01 * i + 1000.0 * which).reshape(p.shape)
        out["step"][name] = torch.tensor(float(k))
    return out


def _set_state(k: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    exp = expected_state(k, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(exp["param"][name])
            opt.state[p] = {"step": exp["step"][name], "exp_avg": exp["exp_avg"][name],
                            "exp_avg_sq": exp["exp_avg_sq"][name]}  # fmt: skip


def _configure_s3_from_env() -> None:
    """Endpoint from CKPTKIT_S3_ENDPOINT; credentials are left to botocore, which reads AWS_* variables."""
    import fsspec.config

    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": os.environ["CKPTKIT_S3_ENDPOINT"]}}


def _saver(url: str) -> None:
    """A training job: resume from the latest checkpoint (if any), then save every step with retention and gc."""
    _configure_s3_from_env()
    # A gc killed by a trial holds its lock until its lease runs out (120 s by default, docs/format.md); a short
    # lease here lets the next trial's saves go on, so the trials measure crash safety rather than the lease.
    import ckptkit.storage.repository

    ckptkit.storage.repository.LOCK_STALE_AFTER = 1.5
    torch.set_num_threads(1)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    repo = Repository(url, part_size=PART_SIZE, max_concurrency=4)
    mgr = ckptkit.CheckpointManager(repo, {"model": model, "optimizer": opt}, rng=False,  # type: ignore[arg-type]
                                    object_size=OBJECT_SIZE, retention=ckptkit.Retention(keep_last=KEEP),
                                    name_format="step-{step:06d}")  # fmt: skip
    latest = mgr.latest()
    start = latest.progress.global_step + 1 if latest else 1
    _set_state(start, model, opt)
    print(f"ready {start}", flush=True)
    for k in range(start, start + MAX_STEPS_PER_RUN):
        if k != start:
            _set_state(k, model, opt)
        mgr.save(k)  # commit, then prune to the newest KEEP and gc their objects
        print(f"committed {k}", flush=True)


def _serve(url: str) -> None:
    """Fork server (tests/forkserver.py): import torch and s3fs once, then fork a :func:`_saver` per trial."""
    import s3fs  # noqa: F401 - imported before forking; no filesystem (and no event loop) exists yet

    forkserver.serve(url, _saver, [sys.executable, __file__, "--saver", url])


# --- helpers ---------------------------------------------------------------------------------------------------


def _raw_fs() -> Any:
    """An s3fs filesystem of its own (no shared instance, no listing cache), with the session's defaults."""
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def _uploads(repo: Repository) -> list[dict[str, Any]]:
    """Incomplete multipart uploads under the repository."""
    bucket, key, _ = repo.fs.split_path(repo.root)
    out = repo.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/")
    return list(out.get("Uploads", []))


def _private(url: str, **kwargs: Any) -> Repository:
    """A repository with a filesystem instance of its own (not shared through fsspec's instance cache), so a
    test may wrap its methods."""
    return Repository(url, {"skip_instance_cache": True}, **kwargs)


def _count_part_uploads(repo: Repository, fail_at: int | None = None) -> dict[str, int]:
    """Wrap the (private) repository's S3 calls: count upload_part calls and the most in flight at once;
    optionally fail the upload of part ``fail_at``."""
    stats = {"parts": 0, "in_flight": 0, "max_in_flight": 0}
    original = repo.fs._call_s3

    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if method != "upload_part":
            return await original(method, *args, **kwargs)
        stats["parts"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            await asyncio.sleep(0.05)  # so that parts overlap even on a fast loopback server
            if kwargs.get("PartNumber") == fail_at:
                raise OSError(5, "injected upload failure")
            return await original(method, *args, **kwargs)
        finally:
            stats["in_flight"] -= 1

    repo.fs._call_s3 = call
    return stats


# --- credentials -----------------------------------------------------------------------------------------------


def test_credentials_from_storage_options_are_never_stored_or_logged(
    s3: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    import fsspec.config

    monkeypatch.delitem(fsspec.config.conf, "s3")  # only the explicit storage options carry the credentials
    options = s3.storage_options()
    secret, key = options["secret"], options["key"]
    url = s3.fresh_url()
    caplog.set_level(logging.DEBUG)  # everything: ckptkit, fsspec, s3fs, botocore
    model = torch.nn.Linear(16, 4)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    mgr = ckptkit.CheckpointManager(url, state, storage_options=options, retention=ckptkit.Retention(keep_last=1),
                                    hparams={"lr": 0.1})  # fmt: skip
    for step in (1, 2, 3):
        mgr.save(step, metrics={"loss": 1.0 / step})
    m = ckptkit.save(url, {"model": model}, "extra", storage_options=options)
    assert ckptkit.restore(url, {"model": torch.nn.Linear(16, 4)}, "extra", storage_options=options).manifest.id == m.id
    assert all(r.ok for r in ckptkit.verify(url, storage_options=options))
    gc(url, storage_options=options)
    repo = Repository(url, options)
    assert sorted(repo.list()) == ["extra", "step-00000003"]
    # A wrong secret fails without the secret in the error either.
    wrong = "wrong-" + secret[::-1]
    with pytest.raises(OSError) as err:
        Repository(url, {**options, "secret": wrong}).list()
    assert wrong not in str(err.value) and wrong not in repr(err.value)

    stored: dict[str, bytes] = {p: repo.fs.cat_file(p) for p in repo.fs.find(repo.root)}
    manifests = [b for p, b in stored.items() if "/checkpoints/" in p]
    assert len(manifests) == 2 and all(json.loads(b)["name"] for b in manifests)
    for path, data in stored.items():
        for needle in (secret, key, options["client_kwargs"]["endpoint_url"]):
            assert needle.encode() not in data, f"{needle!r} was stored in {path}"
    assert repr(repo) == f"Repository({url!r})"
    out, errs = capfd.readouterr()
    assert caplog.records, "nothing was logged: the log check would prove nothing"
    for text in (caplog.text, out, errs, *(str(r.args) for r in caplog.records)):
        assert secret not in text and wrong not in text


# --- multipart uploads -----------------------------------------------------------------------------------------


def test_a_large_object_goes_up_in_parts_concurrently_and_round_trips(s3: Any) -> None:
    url = s3.fresh_url()
    repo = _private(url, part_size=8 * MIB, max_concurrency=3)
    stats = _count_part_uploads(repo)
    big = torch.arange(10 * MIB, dtype=torch.float32)  # 40 MiB in one tensor, so one object
    start = time.monotonic()
    m = ckptkit.save(repo, {"big": {"t": big}}, "a", rng=False, object_size=64 * MIB)
    took = time.monotonic() - start
    ((h, info),) = m.objects.items()
    assert info.size > 40 * MIB
    parts = -(-info.size // (8 * MIB))
    assert stats["parts"] == parts == 6
    assert 2 <= stats["max_in_flight"] <= 3, stats
    etag = repo.fs.info(repo.object_path(h))["ETag"].strip('"')
    assert etag.endswith(f"-{parts}"), f"not stored as a multipart upload: ETag {etag}"
    assert _uploads(repo) == []
    fresh = Repository(url)  # a new client reads it back, hash-verified
    out = ckptkit.restore(fresh, {}, "a", rng=False).values["big"]["t"]
    assert torch.equal(out, big)
    assert all(r.ok for r in ckptkit.verify(url))
    print(f"\n40 MiB object: {parts} parts of 8 MiB, up to {stats['max_in_flight']} at once, saved in {took:.2f}s")


def test_the_objects_of_a_save_share_one_budget_of_parts_in_flight(s3: Any) -> None:
    url = s3.fresh_url()
    repo = _private(url, part_size=5 * MIB, max_concurrency=4)
    stats = _count_part_uploads(repo)
    state = {f"t{i}": torch.full((3 * MIB,), float(i)) for i in range(3)}  # 12 MiB each: one object, 3 parts
    m = ckptkit.save(repo, {"s": state}, "a", rng=False, object_size=12 * MIB)
    assert len(m.objects) == 3 and stats["parts"] == 9
    # more parts at once than one object has: the next object's parts start while the last ones are in flight
    assert stats["max_in_flight"] == 4, stats
    assert _uploads(repo) == []
    out = ckptkit.restore(Repository(url), {}, "a", rng=False).values["s"]
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_a_part_failing_in_a_save_aborts_every_upload_of_the_save(s3: Any) -> None:
    url = s3.fresh_url()
    repo = _private(url, part_size=5 * MIB, max_concurrency=4)
    stats = _count_part_uploads(repo, fail_at=3)
    state = {f"t{i}": torch.full((3 * MIB,), float(i)) for i in range(3)}
    with pytest.raises(OSError, match="injected"):
        ckptkit.save(repo, {"s": state}, "a", rng=False, object_size=12 * MIB)
    assert stats["parts"] >= 3
    assert checkpoints(url) == [] and repo.list_objects() == {}
    assert _uploads(repo) == [], "uploads of the failed save were left open"
    del repo.fs._call_s3
    m = ckptkit.save(repo, {"s": state}, "a", rng=False, object_size=12 * MIB)  # the retry stores it whole
    assert all(r.ok for r in ckptkit.verify(url)) and len(m.objects) == 3


def test_small_objects_are_one_put(s3: Any) -> None:
    repo = _private(s3.fresh_url(), part_size=5 * MIB)
    stats = _count_part_uploads(repo)
    data = os.urandom(5 * MIB)  # exactly one part's worth: still a single PUT
    h = hash_bytes(data)
    assert repo.write_object(h, [memoryview(data)]) == len(data)
    assert stats["parts"] == 0
    assert "-" not in repo.fs.info(repo.object_path(h))["ETag"]
    assert bytes(repo.read_object(h, len(data))) == data


def _sent_headers(repo: Repository) -> list[dict[str, str]]:
    """Record the headers of every PUT the (private) repository's client sends, as they go on the wire."""
    sent: list[dict[str, str]] = []
    repo.write_object(hash_bytes(b"x"), [memoryview(b"x")])  # s3fs makes its client on first use

    def record(request: Any, **_: Any) -> None:
        if request.method == "PUT":
            sent.append({k.lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in request.headers.items()})

    repo.fs.s3.meta.events.register("before-send.s3", record)
    sent.clear()
    return sent


def test_uploads_carry_the_sha256_and_crc32_of_their_own_bytes(s3: Any) -> None:
    """Each part's SHA-256 (SigV4 over plain HTTP) and CRC32 are computed on worker threads, not by botocore on
    s3fs's loop; what goes on the wire must be those of exactly the part's bytes, across the object's buffers."""
    import base64
    import hashlib
    import zlib

    repo = _private(s3.fresh_url(), part_size=5 * MIB, max_concurrency=3)
    sent = _sent_headers(repo)
    data = os.urandom(13 * MIB + 12345)  # 3 parts, the last one short; buffers that do not align with the parts
    views = [memoryview(data[: 3 * MIB + 7]), memoryview(data[3 * MIB + 7 : 11 * MIB]), memoryview(data[11 * MIB :])]
    h = hash_bytes(data)
    repo.write_object(h, views)
    small = os.urandom(MIB + 3)
    repo.write_object(hash_bytes(small), [memoryview(small[:5]), memoryview(small[5:])])  # one PUT
    bodies = [data[i : i + 5 * MIB] for i in range(0, len(data), 5 * MIB)] + [small]
    def crc(b: bytes) -> str:
        return base64.b64encode((zlib.crc32(b) & 0xFFFFFFFF).to_bytes(4, "big")).decode()

    want = sorted((len(b), hashlib.sha256(b).hexdigest(), crc(b)) for b in bodies)
    got = sorted((int(p["content-length"]), p["x-amz-content-sha256"], p.get("x-amz-checksum-crc32", ""))
                 for p in sent if p.get("content-length", "0") != "0")  # fmt: skip
    assert got == want
    assert bytes(Repository(repo.url).read_object(h, len(data))) == data
    # the same client still presigns (botocore's own s3v4-query signer) and lists as before
    import urllib.request

    with urllib.request.urlopen(repo.fs.url(repo.object_path(hash_bytes(small))), timeout=30) as resp:
        assert resp.read() == small
    assert len(repo.list_objects()) == 3


def test_an_upload_whose_sha256_does_not_match_its_bytes_is_refused_and_leaves_nothing(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server checks the SHA-256 the signer was handed: a body changed after it was hashed (a caller writing
    into a tensor mid-save, say) fails the save with a typed error; it is never stored."""
    import ckptkit.storage.s3 as s3mod
    from ckptkit.errors import StorageError

    real = s3mod._make_body

    def stale(*args: Any) -> Any:
        body, extra = real(*args)
        body.sha256 = "0" * 64
        return body, extra

    monkeypatch.setattr(s3mod, "_make_body", stale)
    repo = _private(s3.fresh_url(), part_size=5 * MIB)
    data = os.urandom(11 * MIB)
    h = hash_bytes(data)
    with pytest.raises(StorageError, match=h):
        repo.write_object(h, [memoryview(data)])
    assert not repo.has_object(h)
    assert _uploads(repo) == []


def test_an_upload_body_streams_and_rewinds_without_copying_its_buffers() -> None:
    """botocore reads a body as a file where it must and rewinds it (``seek(0)``) for a retry; aiohttp streams it
    as views of the caller's buffers."""
    from ckptkit.storage.s3 import _make_body

    data = bytes(range(256)) * (12 * 1024)  # 3 MiB
    views = [memoryview(data[:100]), memoryview(data[100 : 2 * MIB + 1]), memoryview(data[2 * MIB + 1 :])]
    body, extra = _make_body(views, 50, 3 * MIB - 9, False, False)
    want = data[50 : 3 * MIB - 9]
    assert len(body) == len(want) and extra == {} and body.sha256 is None

    async def stream() -> list[memoryview]:
        return [v async for v in body]

    first = asyncio.run(stream())
    assert b"".join(first) == want and max(len(v) for v in first) <= MIB
    assert all(v.obj is data or isinstance(v.obj, bytes) for v in first)  # views, not copies
    assert body.tell() == len(want)
    assert body.seek(0) == 0
    assert b"".join(asyncio.run(stream())) == want  # a retry sends it whole again
    body.seek(0)
    assert body.read(7) + body.read(MIB) + body.read() == want
    assert body.read(5) == b"" and body.seek(-10, 2) == len(want) - 10 and body.read() == want[-10:]


def test_a_lazy_put_uploads_while_its_producer_is_still_producing(s3: Any) -> None:
    """Objects handed over by a generator (a compressed save encodes them so) start uploading before it is done,
    and it is not run further ahead of the uploads than the bytes of two budgets of parts in flight."""
    repo = _private(s3.fresh_url(), part_size=5 * MIB, max_concurrency=2)
    stats = _count_part_uploads(repo)
    blobs = [os.urandom(6 * MIB) for _ in range(8)]
    started_before: list[int] = []

    def produce() -> Any:
        for b in blobs:
            started_before.append(stats["parts"])
            yield hash_bytes(b), [memoryview(b)]

    assert repo.write_objects(produce()) == 8 * 6 * MIB
    assert stats["parts"] == 16
    # 2 x 2 x 5 MiB = 20 MiB ahead at most: the fifth object (24 MiB in) waited for uploads to make room
    assert started_before[0] == 0 and started_before[4] >= 2, started_before
    fresh = Repository(repo.url)
    assert all(bytes(fresh.read_object(hash_bytes(b), len(b))) == b for b in blobs)


def test_a_producer_that_fails_mid_put_leaves_no_object_and_no_upload(s3: Any) -> None:
    repo = _private(s3.fresh_url(), part_size=5 * MIB, max_concurrency=2)
    blobs = [os.urandom(11 * MIB) for _ in range(2)]

    def produce() -> Any:
        for b in blobs:
            yield hash_bytes(b), [memoryview(b)]
        raise ValueError("the encoder broke")

    with pytest.raises(ValueError, match="the encoder broke"):
        repo.write_objects(produce())
    for b in blobs:  # an object whose upload completed is whole; the others are not there at all
        h = hash_bytes(b)
        if repo.has_object(h):
            assert bytes(repo.read_object(h, len(b))) == b
    assert _uploads(repo) == [], "an upload the failed put started was left open"


def test_a_compressed_save_of_many_objects_round_trips_from_s3(s3: Any) -> None:
    """The encoded objects stream into the uploads as they are encoded; each is recorded with its stored form."""
    url = s3.fresh_url()
    Repository(url).configure(codec="byteplane-zstd")
    g = torch.Generator().manual_seed(3)
    state = {f"w{i}": (torch.randn(3 * MIB // 2, generator=g) * 0.02).to(torch.bfloat16) for i in range(6)}
    state["noise"] = torch.randint(-(2**15), 2**15, (MIB,), dtype=torch.int16, generator=g)  # incompressible
    m = ckptkit.save(_private(url, part_size=5 * MIB, max_concurrency=3), {"s": state}, "a", rng=False,
                     object_size=3 * MIB)  # fmt: skip
    stored = {o.codec for o in m.objects.values()}
    assert len(m.objects) == 7 and stored == {"byteplane-zstd", None}, stored
    out = ckptkit.restore(Repository(url), {}, "a", rng=False).values["s"]
    assert all(torch.equal(out[k], v) for k, v in state.items())
    assert all(r.ok for r in ckptkit.verify(url))


def test_interpreter_exit_commits_an_async_save_to_a_compressed_bucket(s3: Any) -> None:
    """A save still being encoded and uploaded when the interpreter exits commits: the exit hook runs before
    concurrent.futures shuts its executors (asyncio resolves a new connection's host on one, the codec encodes on
    one, the uploads checksum on one). As a plain atexit hook it ran after, and the save failed at exit with
    "cannot schedule new futures after interpreter shutdown"."""
    url = s3.fresh_url()
    Repository(url).configure(codec="byteplane-zstd")
    script = textwrap.dedent(f"""
        import os, time, fsspec.config, torch, ckptkit
        from ckptkit.storage import Repository
        fsspec.config.conf["s3"] = {{"client_kwargs": {{"endpoint_url": os.environ["CKPTKIT_S3_ENDPOINT"]}}}}
        real = Repository.write_objects
        def slow(self, objects):
            time.sleep(1.5)  # still to encode and upload when the interpreter begins to exit
            return real(self, objects)
        Repository.write_objects = slow
        g = torch.Generator().manual_seed(0)
        state = {{f"w{{i}}": (torch.randn(3 << 20, generator=g) * 0.02).to(torch.bfloat16) for i in range(4)}}
        mgr = ckptkit.CheckpointManager(Repository({url!r}, part_size=5 << 20), {{"model": state}},
                                        async_save=True, object_size=8 << 20)
        mgr.save(3)
        print("returned", flush=True)
    """)  # exits without wait() or close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **s3.env(),
           "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0 and "returned" in out.stdout, out.stderr[-3000:]
    assert "failed at exit" not in out.stderr, out.stderr[-3000:]
    (m,) = checkpoints(url)
    assert {o.codec for o in m.objects.values()} == {"byteplane-zstd"}
    assert all(r.ok for r in ckptkit.verify(url))


def test_a_failed_multipart_upload_is_aborted_and_leaves_no_object(s3: Any) -> None:
    repo = _private(s3.fresh_url(), part_size=5 * MIB, max_concurrency=2)
    stats = _count_part_uploads(repo, fail_at=3)
    data = os.urandom(23 * MIB)  # 5 parts
    h = hash_bytes(data)
    with pytest.raises(OSError, match="injected"):
        repo.write_object(h, [memoryview(data[: 7 * MIB]), memoryview(data[7 * MIB :])])
    assert stats["parts"] >= 3
    assert not repo.has_object(h)
    assert _uploads(repo) == [], "the failed upload was not aborted"
    # and the next attempt stores it whole
    del repo.fs._call_s3
    repo.write_object(h, [memoryview(data)])
    assert bytes(repo.read_object(h, len(data))) == data


def test_gc_aborts_multipart_uploads_of_killed_saves_once_stale(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILLed save leaves an incomplete multipart upload (invisible, but stored and billed); gc aborts it once
    it is older than STALE_AFTER, and never a recent one, which may belong to a save in progress."""
    import ckptkit.storage.repository
    from ckptkit import storage

    url = s3.fresh_url()
    ckptkit.save(url, {"model": torch.nn.Linear(4, 4)}, "a")
    repo = Repository(url)
    bucket, key, _ = repo.fs.split_path(repo.object_path("ab" * 32))
    upload = repo.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    repo.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 * MIB))
    outside_key = repo.fs.split_path(repo.root + "/elsewhere/file")[1]
    outside = repo.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=outside_key)["UploadId"]
    try:
        assert gc(url).temp_files_removed == 0  # fresh: it may be a save in progress
        assert len(_uploads(repo)) == 2
        monkeypatch.setattr(storage.repository, "STALE_AFTER", 0.0)
        time.sleep(1.1)  # the server's timestamps have a resolution of a second at worst
        assert gc(url, dry_run=True).temp_files_removed == 1
        assert len(_uploads(repo)) == 2
        report = gc(url)
        assert report.temp_files_removed == 1
        assert [u["Key"] for u in _uploads(repo)] == [outside_key]  # only what lies under objects/
        assert all(r.ok for r in ckptkit.verify(url))
    finally:
        repo.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=outside_key, UploadId=outside)


# --- commit and listing ----------------------------------------------------------------------------------------


def test_commit_is_a_conditional_put_that_never_replaces_a_checkpoint(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two savers race for the same name: the existence check passes for both, and the server's
    ``If-None-Match: *`` still lets only the first commit."""
    repo = Repository(s3.fresh_url())
    repo.commit("a", b'{"first": 1}')
    monkeypatch.setattr(repo.fs, "exists", lambda path, **kw: False)  # the other saver checked just before
    with pytest.raises(CheckpointExistsError):
        repo.commit("a", b'{"second": 2}')
    assert repo.read_manifest("a") == b'{"first": 1}'


def test_listings_are_fresh_when_another_client_changes_the_bucket(s3: Any) -> None:
    url = s3.fresh_url()
    repo = Repository(url)
    ckptkit.save(url, {"model": torch.nn.Linear(4, 4)}, "a", rng=False)
    assert repo.list() == ["a"] and len(repo.list_objects()) == 1
    other = _raw_fs()  # another process, as far as caches go
    root = url.removeprefix("s3://")
    other.pipe_file(f"{root}/checkpoints/b.json", other.cat_file(f"{root}/checkpoints/a.json"))
    (h,) = repo.list_objects()
    other.rm_file(repo.object_path(h))
    assert sorted(repo.list()) == ["a", "b"]
    assert not repo.has_object(h), "a deleted object looks present: a save would skip writing it"
    assert repo.list_objects() == {}
    other.pipe_file(f"{root}/gc.lock", json.dumps({"host": "elsewhere", "pid": 1, "time": time.time()}).encode())
    assert repo._gc_lock_held()
    other.rm_file(f"{root}/gc.lock")
    assert not repo._gc_lock_held()


def test_s3_options_are_checked(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="apply to S3"):
        Repository(str(tmp_path), part_size=8 * MIB)
    with pytest.raises(ValueError, match="apply to S3"):
        Repository("memory://x", max_concurrency=2)
    with pytest.raises(ValueError, match="5 MiB"):
        Repository(s3.fresh_url(), part_size=MIB)
    with pytest.raises(ValueError, match="max_concurrency"):
        Repository(s3.fresh_url(), max_concurrency=0)
    with pytest.raises(ValueError, match="use_listings_cache"):
        Repository(s3.fresh_url(), {"use_listings_cache": True})
    repo = Repository(s3.fresh_url(), part_size=16 * MIB, max_concurrency=2)
    assert (repo.part_size, repo.max_concurrency, repo.s3) == (16 * MIB, 2, True)


# --- SIGKILL -----------------------------------------------------------------------------------------------------

TRIALS = 12  # at least; more (up to MAX_TRIALS) until the kills covered every phase the asserts below name
MAX_TRIALS = 24
SEED = 20240612


def _check_restores(url: str, name: str, step: int) -> None:
    model = build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    res = ckptkit.restore(url, {"model": model, "optimizer": opt}, name, rng=False)
    assert res.progress.global_step == step and all(r.ok for r in res.reports.values())
    exp = expected_state(step, model)
    for pname, p in model.named_parameters():
        assert torch.equal(p.detach(), exp["param"][pname]), f"{name}: {pname} differs from step {step}"
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], exp[key][pname]), f"{name}: {key} of {pname} differs"


def _check_repository(url: str, *, restore_all: bool) -> list[str]:
    """Only complete checkpoints are visible: every listed one parses, verifies, and (the latest, or all) restores."""
    names = Repository(url).list()
    manifests = checkpoints(url)
    assert sorted(m.name for m in manifests) == sorted(names), "a listed manifest does not parse"
    reports = ckptkit.verify(url)
    bad = [(r.name, r.problems) for r in reports if not r.ok]
    assert not bad, f"checkpoints failed verification after a crash: {bad}"
    for m in manifests if restore_all else manifests[-1:]:
        assert m.name == f"step-{m.progress.global_step:06d}"
        _check_restores(url, m.name, m.progress.global_step)
    return names


def _pending(repo: Repository) -> dict[str, set[str]]:
    try:
        entries = repo.fs.ls(repo.root + "/pending", detail=False)
    except FileNotFoundError:
        return {}
    return {p.rsplit("/", 1)[1]: set(json.loads(repo.fs.cat_file(p))["objects"]) for p in entries}


@pytest.mark.timeout(300)
def test_sigkill_while_saving_to_s3_never_exposes_a_partial_checkpoint(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptkit import storage

    url = s3.fresh_url()
    repo = Repository(url)
    rng = random.Random(SEED)
    stats = {"mid_save": 0, "multipart_left": 0, "before_first_commit": 0, "commits": 0}
    trials = 0
    env = {k: v for k, v in s3.env().items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                      "CKPTKIT_S3_ENDPOINT")}  # fmt: skip
    # This file as the worker, which knows the S3 server only from its environment.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    worker = forkserver.ForkServer([sys.executable, __file__, url], {**clean, **env, "AWS_EC2_METADATA_DISABLED": "true"},
                                   tmp_path / "worker.log")  # fmt: skip
    try:
        for trial in range(MAX_TRIALS):
            covered = stats["commits"] >= TRIALS // 4 and stats["mid_save"] >= 2 and stats["multipart_left"] >= 1
            if trial >= TRIALS and covered:
                break
            trials = trial + 1
            before = max((m.progress.global_step for m in checkpoints(url)), default=0)
            pending_before = _pending(repo)
            uploads_before = {u["UploadId"] for u in _uploads(repo)}
            pid, start, lines = worker.start()
            assert start == before + 1, "the worker must resume from the latest committed step"
            if trial % 4 == 0:  # before the first commit
                pass
            elif trial % 4 == 1:  # after a commit, somewhere in the next save, however fast this machine is
                began = time.monotonic()
                lines = worker.wait_committed(lines)
                time.sleep(rng.uniform(0.05, 1.0) * (time.monotonic() - began))
            else:
                time.sleep(rng.uniform(0.05, 1.5))
            reported = worker.kill(pid, lines)

            names = _check_repository(url, restore_all=False)
            steps = sorted(int(n.split("-")[1]) for n in names)
            if reported:  # a reported commit is durable, and retention kept the newest
                assert reported == list(range(start, start + len(reported)))
                assert f"step-{reported[-1]:06d}" in names and steps[-1] >= reported[-1]
            new = [s for s in steps if s >= start]
            stats["commits"] += len(reported)
            stats["before_first_commit"] += not new
            referenced = {h for m in checkpoints(url) for h in m.objects}
            left = {k: v for k, v in _pending(repo).items() if k not in pending_before}
            if any(objs - referenced for objs in left.values()):
                stats["mid_save"] += 1
            stats["multipart_left"] += bool({u["UploadId"] for u in _uploads(repo)} - uploads_before)
    finally:
        worker.close()
    print(f"\nS3 crash trials: {trials}, stats: {stats}")
    assert stats["commits"] >= TRIALS // 4, stats  # every trial % 4 == 1 waited for one
    assert stats["mid_save"] >= 2, f"too few kills landed inside a save to prove anything: {stats}"
    assert stats["multipart_left"] >= 1, f"no kill landed inside a multipart upload: {stats}"

    names = _check_repository(url, restore_all=True)
    assert names, "no checkpoint survived the trials"
    referenced = {h for m in checkpoints(url) for h in m.objects}
    report = gc(url)  # the killed saves' pending records are fresh: their objects are kept, nothing breaks
    assert referenced <= set(repo.list_objects())
    assert _check_repository(url, restore_all=False) == names

    # Once the leftovers are stale, gc removes every orphan and aborts every incomplete upload.
    monkeypatch.setattr(storage.repository, "STALE_AFTER", 0.0)
    time.sleep(1.1)
    incomplete, pending = len(_uploads(repo)), len(_pending(repo))
    report = gc(url)
    assert set(repo.list_objects()) == referenced, "orphans survived gc"
    assert _uploads(repo) == [] and _pending(repo) == {}
    assert report.temp_files_removed == incomplete + pending  # aborted uploads + stale pending records
    assert _check_repository(url, restore_all=True) == names
    cli = subprocess.run([sys.executable, "-m", "ckptkit.cli", "verify", url], capture_output=True, text=True,
                         timeout=120, check=False, env={**os.environ, **env, "AWS_EC2_METADATA_DISABLED": "true",
                                                        "AWS_ENDPOINT_URL": env["CKPTKIT_S3_ENDPOINT"]})  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert all(n in cli.stdout for n in names), cli.stdout


if __name__ == "__main__":
    if sys.argv[1] == "--saver":
        _saver(sys.argv[2])
    else:
        _serve(sys.argv[1])
