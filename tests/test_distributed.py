"""Sharded checkpoints through torch.distributed.checkpoint with ckptkit as DCP's storage, run for real: gloo
processes on 127.0.0.1, FSDP2 (``fully_shard``) on CPU. Saved on N ranks, restored on M (2 -> 1, 1 -> 2, 2 -> 4),
weights and Adam moments compared tensor by tensor with the unsharded tensors; a same-size resume is bit-exact
against the uninterrupted run; unchanged frozen shards are stored once; a rank killed mid-save commits nothing.

The worker (tests/dist_worker.py) writes the full tensors it gathered; this file compares them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
import ckptkit.distributed as cd
from ckptkit.errors import CheckpointExistsError, CorruptObjectError, ManifestError, UnsupportedStateError
from ckptkit.schema import Progress
from ckptkit.storage import Repository

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import build, full, optimizer, step

WORKER = str(Path(__file__).parent / "dist_worker.py")
ROOT = str(Path(__file__).parent.parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(n: int, phase: str, out: Path, *args: str) -> dict[str, Any]:
    """Run ``phase`` on ``n`` ranks (forked by one launcher); each rank's exit status and the output, after checking
    that every rank finished the phase (a crash trial may follow it: its victim dies by SIGKILL, the survivors
    fail or are stopped 5 s later)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}  # fmt: skip
    done = subprocess.run([sys.executable, WORKER, str(n), phase, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300, check=False)  # fmt: skip
    text = done.stdout.decode(errors="replace")
    assert done.returncode == 0, text[-4000:]
    for r in range(n):
        assert (out / f"{phase}-done-{r}").exists(), f"rank {r} of {phase}:\n{text[-4000:]}"
    return {"codes": json.loads((out / f"{phase}-codes.json").read_text()), "out": text}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert any("exp_avg_sq" in k for k in want) and any(k.endswith("step") for k in want)  # Adam state is compared
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), f"{k} differs"


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process trains and saves `c1` (world size 1); 2 FSDP2 ranks train, save `a` and `b`, resume from `a`
    and load `c1`; 4 ranks load `b`. Each launch ends with a crash trial in a repository of its own: rank 0 (the
    coordinator) of the 2 dies just before committing, rank 3 of the 4 right after writing an object."""
    base = tmp_path_factory.mktemp("dist")
    repo, single, out = base / "repo", base / "single", base / "out"
    out.mkdir()
    m = build(3)
    opt = optimizer(m)
    torch.manual_seed(3)
    step(m, opt)
    cd.save(single, {"model": m, "optimizer": opt}, "c1")
    torch.save(full(m, opt), out / "ref_c1.pt")
    crashes = {
        "commit": {**_launch(2, "train", out, str(repo), str(out), f"c1={single}", f"crash={base / 'crash-commit'}",
                             "victim=0", "point=commit"), "repo": base / "crash-commit", "victim": 0},
        "write": {**_launch(4, "load", out, str(repo), str(out), "name=b", "tag=b_on_4",
                            f"crash={base / 'crash-write'}", "victim=3", "point=write"),
                  "repo": base / "crash-write", "victim": 3},
    }  # fmt: skip
    return {"repo": repo, "single": single, "out": out, "crashes": crashes}


def test_a_two_rank_checkpoint_loads_on_one_process_exactly(run: dict[str, Any]) -> None:
    m = build(9)  # a plain, unsharded model: the whole tensors come back from the two ranks' shards
    opt = optimizer(m)
    res = cd.load(run["repo"], {"model": m, "optimizer": opt}, "b")
    _same(full(m, opt), _load(run["out"] / "ref_b.pt"))
    assert res.progress.global_step == 6
    assert not res.fidelity.exact and "saved by 2 rank(s), loaded on 1" in str(res.fidelity)


def test_ckptkit_restore_of_a_sharded_checkpoint_says_to_use_distributed_load(run: dict[str, Any]) -> None:
    import ckptkit
    from ckptkit.errors import ManifestError

    m = build(9)
    with pytest.raises(ManifestError, match=r"sharded checkpoint written by 2 rank\(s\): load it with ckptkit\.distributed\.load"):
        ckptkit.restore(str(run["repo"]), {"model": m}, "b")


def test_a_two_rank_checkpoint_loads_on_four_ranks_exactly(run: dict[str, Any]) -> None:
    _same(_load(run["out"] / "b_on_4.pt"), _load(run["out"] / "ref_b.pt"))
    info = json.loads((run["out"] / "b_on_4.json").read_text())
    assert not info["exact"] and "RNG not restored: saved by 2 rank(s), loaded on 4" in info["fidelity"]


def test_a_one_process_checkpoint_loads_on_two_fsdp_ranks_exactly(run: dict[str, Any]) -> None:
    _same(_load(run["out"] / "from_c1.pt"), _load(run["out"] / "ref_c1.pt"))
    assert cd.RepositoryReader(run["single"], "c1").world_size == 1


def test_a_same_world_size_resume_is_bit_exact(run: dict[str, Any]) -> None:
    """Loaded into fresh objects with scrambled RNG, 3 more steps (dropout, batches from each rank's RNG) give
    exactly the weights and moments of the run that never stopped."""
    _same(_load(run["out"] / "resumed_b.pt"), _load(run["out"] / "ref_b.pt"))
    info = json.loads((run["out"] / "resumed_b.json").read_text())
    assert info["exact"] and info["step"] == 3, info


def test_the_manifest_records_world_size_and_each_ranks_shards(run: dict[str, Any]) -> None:
    m = ckptkit.inspect(run["repo"], "b")
    assert m.components["dcp"].meta["world_size"] == 2
    assert {"shards-00000", "shards-00001", "rng-00000", "rng-00001"} <= set(m.components)
    for r in (0, 1):  # FSDP2 shards dim 0: each rank holds its half of every trainable weight and its moments
        keys = set(m.components[f"shards-0000{r}"].tensors)
        assert f"model.3.weight@{8 * r},0" in keys and f"optimizer.state.3.weight.exp_avg@{8 * r},0" in keys
    entry = m.components["dcp"].state["entries"]["model.3.weight"]["tensor"]  # type: ignore[index,call-overload]
    assert entry["size"] == [16, 16] and [c["sizes"] for c in entry["chunks"]] == [[8, 16], [8, 16]]
    assert m.components["dcp"].state["entries"]["optimizer.param_groups.0.lr"] == {"bytes": 0.01}  # type: ignore[index,call-overload]
    raw = Repository(str(run["repo"])).read_manifest("b")
    assert b"\x80" not in raw and b"torch.save" not in raw  # typed JSON, no pickle


def test_unchanged_frozen_shards_are_stored_once(run: dict[str, Any]) -> None:
    a, b = (ckptkit.inspect(run["repo"], n) for n in ("a", "b"))

    def objects_of(m: ckptkit.schema.Manifest, prefix: str) -> set[str]:
        return {ref.object for r in (0, 1) for k, ref in m.components[f"shards-0000{r}"].tensors.items()
                if k.startswith(prefix)}  # fmt: skip

    frozen = objects_of(b, "model.0.")
    assert frozen and frozen == objects_of(a, "model.0.")  # the same objects, by hash
    assert not objects_of(b, "model.3.") & objects_of(a, "model.3.")  # trained layers did change
    before = json.loads((run["out"] / "objects_after_a.json").read_text())
    stored = {p.name: p.stat().st_mtime_ns for p in (run["repo"] / "objects").rglob("*") if p.is_file()}
    assert all(stored[h] == before[h] for h in frozen)  # not rewritten by the save of b
    assert set(stored) == set(a.objects) | set(b.objects)  # content-addressed: nothing stored twice


def test_diff_of_sharded_checkpoints_compares_whole_tensors(run: dict[str, Any]) -> None:
    """ckptkit.history.diff on two sharded checkpoints: the frozen layer is unchanged without being read, the
    trained ones changed; against the one-process checkpoint (another world size, other chunks) tensors are read."""
    from ckptkit.history.diff import diff

    d = diff(run["repo"], "a", run["repo"], "b")
    assert {k for k, t in d.tensors.items() if t.status == "unchanged"} >= {"0.weight", "0.bias"}
    assert d.tensors["3.weight"].status == "changed" and (d.tensors["3.weight"].rel_l2 or 0) > 0
    assert d.counts() == diff(run["repo"], "b", run["repo"], "a").counts()
    same = diff(run["repo"], "b", run["repo"], "b")
    assert set(same.counts()) == {"unchanged"}
    across = diff(run["single"], "c1", run["repo"], "b")
    assert set(across.tensors) == set(d.tensors) and across.counts().get("changed", 0) >= 1


def test_verify_passes_and_a_flipped_shard_byte_is_caught(run: dict[str, Any], tmp_path: Path) -> None:
    assert [(r.name, r.ok) for r in ckptkit.verify(run["repo"])] == [("a", True), ("b", True)]
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run["repo"]), str(copy)], check=True)
    r = Repository(str(copy))
    m = ckptkit.inspect(r, "b")
    h = m.components["shards-00001"].tensors["model.3.weight@8,0"].object
    path = Path(r.object_path(h))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    rep = {x.name: x for x in ckptkit.verify(r)}
    assert not rep["b"].ok and rep["b"].files == [str(path)]
    model = build(9)
    opt = optimizer(model)
    with pytest.raises(CorruptObjectError):
        cd.load(r, {"model": model, "optimizer": opt}, "b")


def test_save_refuses_a_taken_name_and_values_that_need_pickle(tmp_path: Path) -> None:
    m = build(1)
    cd.save(tmp_path, {"model": m, "step": 7, "note": {"lr": 0.1, "tags": ("a", "b")}}, "x",
            progress=Progress(global_step=7))  # fmt: skip
    with pytest.raises(CheckpointExistsError):
        cd.save(tmp_path, {"model": m}, "x")
    with pytest.raises(UnsupportedStateError, match="object"):
        cd.save(tmp_path, {"model": m, "bad": object()}, "y")
    assert [c.name for c in ckptkit.checkpoints(tmp_path)] == ["x"]
    res = cd.load(tmp_path, {"model": build(2), "step": 0, "note": None})
    assert res.values == {"step": 7, "note": {"lr": 0.1, "tags": ("a", "b")}}
    ckptkit.save(tmp_path, {"model": m}, "plain")
    with pytest.raises(ManifestError, match=r"ckptkit\.distributed\.save"):
        cd.load(tmp_path, {"model": build(2)}, "plain")


@pytest.mark.parametrize("point", ["commit", "write"])
def test_a_rank_killed_mid_save_commits_nothing(run: dict[str, Any], point: str) -> None:
    trial = run["crashes"][point]
    codes, victim = trial["codes"], trial["victim"]
    assert codes[victim] == -9, trial["out"][-3000:]
    assert all(c not in (0, 3) for c in codes), codes  # no survivor's save of q returned as if it had succeeded
    repo = trial["repo"]
    assert Repository(str(repo)).list() == ["p"]
    assert ckptkit.inspect(repo).name == "p"  # the previous checkpoint stays the latest
    assert [r.ok for r in ckptkit.verify(repo)] == [True]
    model = build(9)
    cd.load(repo, {"model": model})  # and loads
    if point == "write":  # the victim did store an object before it died: garbage for gc, never a checkpoint
        assert set(Repository(str(repo)).list_objects()) - set(ckptkit.inspect(repo, "p").objects)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_dcp_storage_classes_work_with_dcp_directly(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    sd = {"w": torch.arange(12.0).reshape(3, 4), "meta": {"epoch": 2, "name": "x"}}
    writer = cd.RepositoryWriter(tmp_path, "direct")
    try:
        dcp.save(sd, storage_writer=writer, no_dist=True)
    finally:
        writer.close()
    assert writer.manifest is not None and writer.written == 1
    assert not list((tmp_path / "pending").iterdir())  # closed: nothing left protecting objects from gc
    into = {"w": torch.zeros(3, 4), "meta": {"epoch": 0, "name": ""}}
    dcp.load(into, storage_reader=cd.RepositoryReader(tmp_path, "direct"), no_dist=True)
    assert torch.equal(into["w"], sd["w"]) and into["meta"] == {"epoch": 2, "name": "x"}


def test_a_crafted_manifest_is_refused_before_anything_is_read(run: dict[str, Any]) -> None:
    from ckptkit.distributed.layout import metadata_from_json

    m = ckptkit.inspect(run["repo"], "b")
    state = json.loads(json.dumps(m.components["dcp"].state))
    chunk = state["entries"]["model.3.weight"]["tensor"]["chunks"][1]
    for field, bad, says in (("offsets", [12, 0], "outside"), ("rank", 5, "names no shards"),
                             ("key", "model.0.weight@8,0", "the entry says"), ("key", "nope", "is not a shard")):  # fmt: skip
        crafted = {**chunk, field: bad}
        s = json.loads(json.dumps(state))
        s["entries"]["model.3.weight"]["tensor"]["chunks"][1] = crafted
        dcp_comp = m.components["dcp"].model_copy(update={"state": s})
        with pytest.raises(ManifestError, match=says):
            metadata_from_json(m.model_copy(update={"components": {**m.components, "dcp": dcp_comp}}))
