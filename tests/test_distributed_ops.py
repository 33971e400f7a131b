"""Sharded checkpoints beyond save and load, run for real on 2 gloo ranks with FSDP2 on CPU: async saves while
training goes on, a rank's failure surfacing as a typed error, gc beside a save in flight on another rank,
retention applied by rank 0 alone, lineage across a resume, a sharded checkpoint consolidated into one
safetensors file, the benchmark's smoke run, and crash trials.

Crash trials: a rank killed by SIGKILL in the middle of a save, on local disk and on the real S3 server (Ceph's
RADOS Gateway, tests/s3server.py), each trial a launch of 2 ranks started as torchrun starts them (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Kill points: before the victim stores any object, after its
first object, after all its objects (before it reports them), and the coordinator just before the commit. After
every trial: no new checkpoint, the previous one still the latest and verifying, and the next launch resumes from
it with exactly the state it saved (a checksum of every weight and Adam moment, recorded in the checkpoint's
metrics, computed again after the load).

Every launch is forked by one process that imported torch once (tests/dist_worker.py ``suite``), to fit the CI
time budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptkit
import ckptkit.distributed as cd
from ckptkit.errors import DestinationNotEmptyError, InvalidArgumentError
from ckptkit.storage import Repository

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import build, full, optimizer, step

WORKER = str(Path(__file__).parent / "dist_worker.py")
ROOT = str(Path(__file__).parent.parent)


LOCAL_PLAN = "clean,0:start,1:some,1:written,0:commit,1:start,0:some,clean"
S3_PLAN = "clean,1:some,0:start,1:written,0:commit,clean"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Any]:
    """One run of the worker: the ``ops`` launch, the local crash trials, and the S3 ones when the S3 server is
    there (outside CI, where it must be, a missing server skips only the S3 test)."""
    base = tmp_path_factory.mktemp("dist-ops")
    repo, retain, out, local = base / "repo", base / "retain", base / "out", base / "crash"
    out.mkdir()
    jobs = [f"ops@{repo}@{retain}", f"local@{LOCAL_PLAN}@{local}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    s3_url = None
    try:
        s3 = request.getfixturevalue("s3")
    except pytest.skip.Exception:
        s3 = None
    if s3 is not None:
        s3_url = s3.fresh_url()
        jobs.append(f"s3@{S3_PLAN}@{s3_url}")
        env.update({k: v for k, v in s3.env().items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                "CKPTKIT_S3_ENDPOINT")})  # fmt: skip
        env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"})
    done = subprocess.run([sys.executable, WORKER, "suite", str(out), *jobs], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300, check=False)  # fmt: skip
    text = done.stdout.decode(errors="replace")
    assert done.returncode == 0, text[-4000:]
    return {"repo": repo, "retain": retain, "out": out, "local": str(local), "s3": s3_url, "text": text}


@pytest.fixture(scope="module")
def ops(suite: dict[str, Any]) -> dict[str, Any]:
    out = suite["out"]
    assert json.loads((out / "ops-codes.json").read_text()) == [[0, 0]], suite["text"][-4000:]
    return {**suite, "info": [json.loads((out / f"ops-{r}.json").read_text()) for r in (0, 1)]}


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}


def test_an_async_save_commits_the_state_as_it_was_at_the_call(ops: dict[str, Any]) -> None:
    """Two optimizer steps ran while the shards were written (slowed down); the checkpoint holds the weights and
    moments of the call, not those of the steps after it."""
    for info in ops["info"]:
        assert info["in_flight_after_call"] and info["in_flight_after_steps"] and info["s2"] == "s2", info
    ref = torch.load(ops["out"] / "s2.pt", weights_only=True)
    m = build(9)
    opt = optimizer(m)
    cd.load(ops["repo"], {"model": m, "optimizer": opt}, "s2")
    got = full(m, opt)
    for k, t in ref["at_call"].items():
        assert torch.equal(got[k], t), k
    assert any(not torch.equal(ref["at_call"][k], ref["after"][k]) for k in ref["at_call"])  # training did go on


def test_a_failed_rank_surfaces_as_a_typed_error_on_every_rank_and_commits_nothing(ops: dict[str, Any]) -> None:
    for info in ops["info"]:
        for key in ("wait_raised", "next_call_raised"):  # from wait(), and unseen from the next call
            kind, msg = info[key]
            assert kind == "DistributedCheckpointError" and "rank 1" in msg and "injected I/O error" in msg, info
            assert "nothing was committed" in msg
        assert info["s4"] == "s4" and info["wait_after"] == ["s4", None]  # the next save went through
    names = Repository(str(ops["repo"])).list()
    assert "s3" not in names and names == ["s1", "s2", "s4", "s5"]
    assert all(r.ok for r in ckptkit.verify(ops["repo"]))


def test_gc_beside_a_save_in_flight_on_another_rank_keeps_its_objects(ops: dict[str, Any]) -> None:
    """Rank 1 had written its objects and not yet committed when rank 0 ran gc: gc removed the planted orphan and
    kept rank 1's objects (its pending record held them); the save then committed and verifies."""
    r0, r1 = ops["info"]
    assert r0["gc_removed"] >= 1 and r1["written_during_gc"]
    repo = Repository(str(ops["repo"]))
    stored = repo.list_objects()
    assert r0["orphan"] not in stored
    s5 = ckptkit.inspect(repo, "s5")
    assert set(r1["written_during_gc"]) <= set(s5.objects) <= set(stored)
    assert {r.name: r.ok for r in ckptkit.verify(repo)}["s5"]
    assert not list((ops["repo"] / "pending").iterdir())


def test_retention_is_applied_by_rank_0_alone_and_keeps_the_resume_source(ops: dict[str, Any]) -> None:
    r0, r1 = ops["info"]
    assert sorted(r0["retired"]) == ["t2", "t3"] and r1["retired"] == []
    repo = Repository(str(ops["retain"]))
    assert repo.list() == ["t1", "t4"]  # keep_last=1, and t1, which the run resumed from
    referenced = {h for n in repo.list() for h in ckptkit.inspect(repo, n).objects}
    assert set(repo.list_objects()) == referenced  # gc collected the pruned checkpoints' objects
    assert all(r.ok for r in ckptkit.verify(repo))


def test_lineage_records_the_resume_and_the_chain_after_it(ops: dict[str, Any]) -> None:
    repo = Repository(str(ops["retain"]))
    t1, t4 = ckptkit.inspect(repo, "t1"), ckptkit.inspect(repo, "t4")
    t2 = ckptkit.schema.parse_manifest(repo.read_archived(t4.lineage.parents[0].id) or b"", "t3")
    t2 = ckptkit.schema.parse_manifest(repo.read_archived(t2.lineage.parents[0].id) or b"", "t2")
    assert t2.name == "t2" and t2.lineage.relation == "resume"
    assert [(p.name, p.id) for p in t2.lineage.parents] == [("t1", t1.id)]
    assert t4.lineage.relation == "train"


def test_consolidate_writes_the_unsharded_state_dict(ops: dict[str, Any], tmp_path: Path) -> None:
    ref = _plain(torch.load(ops["out"] / "s2.pt", weights_only=True)["at_call"])
    files = cd.consolidate(ops["repo"], tmp_path / "x", "s2")
    assert [Path(f).name for f in files] == ["model.safetensors", "ckptkit.json"]
    got = load_file(tmp_path / "x" / "model.safetensors")
    model = build(3)
    assert got.keys() == model.state_dict().keys()
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    model.load_state_dict(got)
    prov = json.loads((tmp_path / "x" / "ckptkit.json").read_text())
    assert prov["checkpoint"] == ckptkit.inspect(ops["repo"], "s2").id
    with pytest.raises(DestinationNotEmptyError):
        cd.consolidate(ops["repo"], tmp_path / "x", "s2")
    with pytest.raises(InvalidArgumentError, match="'model', 'optimizer'"):
        cd.full_state_dict(ops["repo"], "s2", component="nope")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_in_one_process(tmp_path: Path) -> None:
    m = build(1)
    opt = optimizer(m)
    step(m, opt)
    pending = cd.async_save(tmp_path, {"model": m, "optimizer": opt}, "a")
    assert pending.wait().name == "a" and cd.wait().name == "a" and cd.wait() is None  # type: ignore[union-attr]
    cd.async_save(tmp_path, {"model": m}, "a")  # taken: fails in the background
    with pytest.raises(ckptkit.errors.CheckpointExistsError):
        cd.wait()
    assert cd.wait() is None  # raised once


def test_bench_distributed_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(Path(ROOT) / "bench" / "distributed.py"), "--size-mib", "8", "--runs", "1", "--json",
           "--dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    for key in ("dist_save_vs_dcp", "dist_restore_vs_dcp", "dist_dedup_vs_min"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (key, result)
    assert set(result["targets"]) == set(result["pass"]) == {"dist_save_vs_dcp", "dist_restore_vs_dcp",
                                                             "dist_dedup_vs_min"}  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def _check(url: str, out: Path, tag: str, plan: str) -> None:
    items = plan.split(",")
    codes = json.loads((out / f"{tag}-codes.json").read_text())
    assert codes[0] == [0, 0] and codes[-1] == [0, 0], codes
    first = json.loads((out / f"{tag}-trial-0.json").read_text())
    assert first["names"] == [] and "resumed" not in first
    for k in range(1, len(items)):
        record = json.loads((out / f"{tag}-trial-{k}.json").read_text())
        # what the launch after trial k-1 found: only c-0 (no killed save committed), verifying, and resumed
        assert record["names"] == ["c-0"] and record["verified"] == [True], (k, record)
        assert record["resumed"] == "c-0" and record["checksum_ok"] and record["exact"], (k, record)
        if items[k] != "clean":
            victim = int(items[k].split(":")[0])
            assert codes[k][victim] == -9, (k, codes)
            assert codes[k][1 - victim] not in (0, 3), (k, codes)  # the survivor's save never succeeded
    orphans = [json.loads((out / f"{tag}-trial-{k}.json").read_text())["orphans"] for k in range(len(items))]
    assert orphans[-1] > 0  # killed saves did store objects: garbage for gc, never a checkpoint
    names = [m.name for m in ckptkit.checkpoints(url)]
    assert names == ["c-0", f"c-{len(items) - 1}"]  # the clean launch after the trials committed
    assert all(r.ok for r in ckptkit.verify(url))


def test_a_rank_killed_at_any_point_of_a_save_on_local_disk_commits_nothing(suite: dict[str, Any]) -> None:
    _check(suite["local"], suite["out"], "local", LOCAL_PLAN)
    assert cd.RepositoryReader(suite["local"], ckptkit.inspect(suite["local"]).name).world_size == 2
    assert list((Path(suite["local"]) / "pending").iterdir())  # the killed saves' records: stale for gc, later


def test_a_rank_killed_at_any_point_of_a_save_on_s3_commits_nothing(suite: dict[str, Any]) -> None:
    if suite["s3"] is None:
        pytest.skip("the S3 server is not available (see the s3 fixture)")
    _check(suite["s3"], suite["out"], "s3", S3_PLAN)


def test_stored_tensors_tell_unchanged_tensors_without_reading_them(ops: dict[str, Any]) -> None:
    """What a diff of two sharded checkpoints needs: the frozen first layer is stored in the same chunks."""
    a, b = (cd.stored_tensors(ckptkit.inspect(ops["repo"], n)) for n in ("s1", "s2"))
    assert a.keys() == b.keys() == build(0).state_dict().keys()
    assert {k for k in a if a[k] == b[k]} == {"0.weight", "0.bias"}
    assert a["3.weight"].shape == [16, 16] and len(a["3.weight"].chunks) == 2  # one chunk per rank
    ref = _plain(torch.load(ops["out"] / "s2.pt", weights_only=True)["at_call"])
    got = cd.full_state_dict(ops["repo"], "s2", keys=["3.weight"])
    assert list(got) == ["3.weight"] and torch.equal(got["3.weight"], ref["3.weight"])
