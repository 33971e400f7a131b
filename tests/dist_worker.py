"""The ranks of tests/test_distributed.py, on gloo (CPU): run with MASTER_ADDR and MASTER_PORT set.

``python dist_worker.py N PHASE REPO OUT [key=value ...]`` imports torch and ckptkit once, then forks N ranks (so
the test pays for one interpreter start, not N), waits for them and writes each one's exit status to
``OUT/PHASE-codes.json`` (after a rank dies by SIGKILL, the others get 5 s to fail by themselves, then are killed).
Rank 0 writes what the test compares into OUT (full
tensors gathered from the shards by ``full()``), every rank a marker ``PHASE-done-RANK`` once the phase is done:

* ``train`` (``c1=REPO``): FSDP2 (``fully_shard``) model with a frozen first layer; 3 steps, save ``a``; 3 steps,
  save ``b`` (``ref_b.pt``); then, in fresh objects with scrambled RNG, load ``a`` and run the same 3 steps
  (``resumed_b.pt``, ``.json``); then load ``c1`` from the repository saved by one process (``from_c1.pt``).
* ``load`` (``name=NAME tag=TAG``): load NAME into a fresh sharded model (``TAG.pt``, ``TAG.json``).

Then, with ``crash=REPO victim=RANK point=write|commit``: save ``p`` there, one step, and save ``q``, during which
rank RANK kills itself with SIGKILL (``write``: after storing its first object; ``commit``: just before the manifest
is written); a survivor whose save of ``q`` returned exits with status 3.

``python dist_worker.py suite OUT JOB ...`` (tests/test_distributed_ops.py) imports torch once and forks every
launch of 2 ranks started as torchrun starts them: ``ops@REPO@RETAIN`` runs :func:`ops` (async saves, a failing
rank, gc beside a save in flight, retention, lineage), ``TAG@PLAN@URL`` one crash trial per item of ``PLAN``
(:func:`trial`), local or S3.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import random
import signal
import sys
from typing import Any

import numpy as np
import torch


def build(seed: int = 0) -> torch.nn.Module:
    """A tiny MLP with dropout; its first layer is frozen (no optimizer state, never changes)."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 16),
                            torch.nn.ReLU(), torch.nn.Linear(16, 4))  # fmt: skip
    m[0].requires_grad_(False)
    return m


def optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)


def step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """One step on a batch drawn from this rank's global RNG (so a resume must restore it), with dropout."""
    x = torch.randn(4, 8)
    m(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def full(m: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every weight and Adam state tensor, unsharded, keyed by parameter name (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    def whole(t: Any) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    out = {f"model.{k}": whole(v) for k, v in get_model_state_dict(m).items()}
    for fqn, st in get_optimizer_state_dict(m, opt)["state"].items():
        out.update({f"optim.{fqn}.{k}": whole(v) for k, v in st.items()})
    return out


def shard(m: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    return m


def scramble() -> None:
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)


def main(phase: str, repo: str, out: str, *options: str) -> None:
    import torch.distributed as dist

    import ckptkit.distributed as cd
    from ckptkit.schema import Progress

    opts = dict(o.split("=", 1) for o in options)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()

    def dump(tag: str, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> None:
        if rank == 0:
            torch.save(tensors, os.path.join(out, f"{tag}.pt"))
            if info is not None:
                with open(os.path.join(out, f"{tag}.json"), "w") as f:
                    json.dump(info, f)

    def fresh(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = shard(build(seed))
        return m, optimizer(m)

    def loaded(name: str, tag: str, src: str = repo) -> None:
        m, opt = fresh(7)
        scramble()
        res = cd.load(src, {"model": m, "optimizer": opt}, name)
        dump(tag, full(m, opt), {"fidelity": str(res.fidelity), "exact": res.fidelity.exact, "name": res.manifest.name,
                                 "step": res.progress.global_step})  # fmt: skip

    if phase == "train":
        m, opt = fresh(0)
        torch.manual_seed(100 + rank)
        for i in range(6):
            step(m, opt)
            if i == 2:
                cd.save(repo, {"model": m, "optimizer": opt}, "a", progress=Progress(global_step=3))
                if rank == 0:  # when each object was stored: a second save must not rewrite the unchanged ones
                    objs = {f: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(os.path.join(repo,
                            "objects")) for f in fs}  # fmt: skip
                    with open(os.path.join(out, "objects_after_a.json"), "w") as f:
                        json.dump(objs, f)
        cd.save(repo, {"model": m, "optimizer": opt}, "b", progress=Progress(global_step=6))
        dump("ref_b", full(m, opt))
        m, opt = fresh(5)
        scramble()
        res = cd.load(repo, {"model": m, "optimizer": opt}, "a")
        for _ in range(3):
            step(m, opt)
        dump("resumed_b", full(m, opt), {"fidelity": str(res.fidelity), "exact": res.fidelity.exact,
                                         "step": res.progress.global_step})  # fmt: skip
        loaded("c1", "from_c1", opts["c1"])
    elif phase == "load":
        loaded(opts["name"], opts["tag"])
    dist.barrier()
    with open(os.path.join(out, f"{phase}-done-{rank}"), "w"):
        pass
    if "crash" in opts:
        crash(opts["crash"], int(opts["victim"]), opts["point"], rank)
    dist.destroy_process_group()


def ops(repo: str, retain: str, out: str, rank: int) -> None:
    """Async saves, failures, gc beside a save in flight, retention across ranks (``test_distributed_ops.py``)."""
    import time

    import torch.distributed as dist

    import ckptkit
    import ckptkit.distributed as cd
    from ckptkit.api import gc
    from ckptkit.errors import CkptkitError
    from ckptkit.hashing import hash_bytes
    from ckptkit.storage import Repository

    info: dict[str, Any] = {}

    def mark(name: str) -> str:
        return os.path.join(out, name)

    def until(name: str) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(mark(name)) and time.monotonic() < deadline:
            time.sleep(0.01)

    original = Repository.write_objects
    m = shard(build(0))
    opt = optimizer(m)
    state = {"model": m, "optimizer": opt}
    torch.manual_seed(100 + rank)
    step(m, opt)
    cd.save(repo, state, "s1")
    step(m, opt)

    # 1. An async save while training goes on: the writes are slowed down so that the steps run during them.
    def slow(self: Repository, objects: list[Any]) -> int:
        time.sleep(0.4)
        return original(self, objects)

    Repository.write_objects = slow  # type: ignore[method-assign]
    pending = cd.async_save(repo, state, "s2")
    info["in_flight_after_call"] = not pending.done()
    at_call = full(m, opt)  # a collective on the default group while the save's run on their own group
    for _ in range(2):
        step(m, opt)
    info["in_flight_after_steps"] = not pending.done()
    after = full(m, opt)
    info["s2"] = pending.wait().name
    if rank == 0:
        torch.save({"at_call": at_call, "after": after}, mark("s2.pt"))

    # 2. One rank fails: the error surfaces on every rank, from wait() and, unseen, from the next call.
    def fail(self: Repository, objects: list[Any]) -> int:
        raise OSError(5, "injected I/O error on rank 1")

    Repository.write_objects = fail if rank == 1 else original  # type: ignore[method-assign]
    try:
        cd.async_save(repo, state, "s3").wait()
        info["wait_raised"] = None
    except CkptkitError as err:
        info["wait_raised"] = [type(err).__name__, str(err)]
    cd.async_save(repo, state, "s3")
    try:
        cd.async_save(repo, state, "s4")
        info["next_call_raised"] = None
    except CkptkitError as err:
        info["next_call_raised"] = [type(err).__name__, str(err)]
    Repository.write_objects = original  # type: ignore[method-assign]
    info["s4"] = cd.async_save(repo, state, "s4").wait().name
    info["wait_after"] = [getattr(cd.wait(), "name", None), cd.wait()]

    # 3. gc while rank 1 is in the middle of an async save (its objects written, not committed yet).
    step(m, opt)
    written: list[str] = []
    if rank == 0:
        orphan = os.urandom(1000)
        Repository(repo).write_object(hash_bytes(orphan), [memoryview(orphan)])
        info["orphan"] = hash_bytes(orphan)
    dist.barrier()

    def write_then_wait(self: Repository, objects: list[Any]) -> int:
        n = original(self, objects)
        written.extend(h for h, _ in objects)
        with open(mark("gc-go"), "w"):
            pass
        until("gc-done")
        return n

    if rank == 1:
        Repository.write_objects = write_then_wait  # type: ignore[method-assign]
    pending = cd.async_save(repo, state, "s5")
    if rank == 0:
        until("gc-go")
        report = gc(repo)
        info["gc_removed"] = report.objects_removed
        with open(mark("gc-done"), "w"):
            pass
    info["s5"] = pending.wait().name
    info["written_during_gc"] = written
    Repository.write_objects = original  # type: ignore[method-assign]

    # 4. Retention across ranks and lineage: resume from t1, then saves with keep_last=1.
    calls: list[str] = []
    retire = Repository.retire

    def counted(self: Repository, name: str, manifest_id: str) -> None:
        calls.append(name)
        retire(self, name, manifest_id)

    Repository.retire = counted  # type: ignore[method-assign]
    cd.save(retain, state, "t1")
    m, opt = fresh_pair(9)
    state = {"model": m, "optimizer": opt}
    cd.load(retain, state, "t1")
    rules = ckptkit.Retention(keep_last=1)
    step(m, opt)
    cd.async_save(retain, state, "t2", retention=rules)
    step(m, opt)
    cd.save(retain, state, "t3", retention=rules)  # waits for t2 first
    step(m, opt)
    cd.async_save(retain, state, "t4", retention=rules).wait()
    info["retired"] = calls
    Repository.retire = retire  # type: ignore[method-assign]
    with open(mark(f"ops-{rank}.json"), "w") as f:
        json.dump(info, f)


def fresh_pair(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    m = shard(build(seed))
    return m, optimizer(m)


def crash(repo: str, victim: int, point: str, rank: int) -> None:
    import ckptkit.distributed as cd
    from ckptkit.storage import Repository

    m = shard(build(0))
    opt = optimizer(m)
    torch.manual_seed(100 + rank)
    step(m, opt)
    cd.save(repo, {"model": m, "optimizer": opt}, "p")
    step(m, opt)
    if rank == victim:

        def die(*_: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        if point == "write":
            original = Repository.write_objects

            def write_then_die(self: Repository, objects: list[Any]) -> int:
                original(self, objects[:1])
                die()
                return 0

            Repository.write_objects = write_then_die  # type: ignore[method-assign]
        else:
            Repository.commit = die  # type: ignore[method-assign,assignment]
    cd.save(repo, {"model": m, "optimizer": opt}, "q")
    sys.exit(3)  # a survivor must not get here: the save of q cannot succeed without the victim


def launch(n: int, phase: str, *args: str) -> None:
    import traceback

    import torch.distributed.fsdp  # noqa: F401  (imported once, before the fork)

    import ckptkit.distributed  # noqa: F401

    pids = []
    for r in range(n):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(r), WORLD_SIZE=str(n))
            try:
                main(phase, *args)
            except SystemExit as err:
                os._exit(err.code if isinstance(err.code, int) else 1)
            except BaseException:
                traceback.print_exc()
                sys.stdout.flush()
                os._exit(1)
            sys.stdout.flush()
            os._exit(0)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = None
    import time

    while len(codes) < n:
        if deadline is not None and time.monotonic() > deadline:
            for r, pid in enumerate(pids):
                if r not in codes:
                    os.kill(pid, signal.SIGKILL)
            deadline = None
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            continue
        code = os.waitstatus_to_exitcode(status)
        codes[pids.index(pid)] = code
        if code == -signal.SIGKILL and deadline is None and len(codes) == 1:
            deadline = time.monotonic() + 5
    with open(os.path.join(args[1], f"{phase}-codes.json"), "w") as f:
        json.dump([codes[r] for r in range(n)], f)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def trial(repo: str, out: str, tag: str, k: int, victim: int, point: str) -> None:
    """One launch of a crash trial (``test_distributed_ops.py``), on a rank started the way torchrun starts it
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): resume from the latest checkpoint (rank 0 first
    records what the repository holds and whether it verifies), one step, and save ``c-K`` with the state's
    checksum as a metric; rank ``victim`` (-1: none) kills itself at ``point`` of that save."""
    import torch.distributed as dist

    import ckptkit
    import ckptkit.distributed as cd
    from ckptkit.distributed.storage import RepositoryWriter
    from ckptkit.storage import Repository

    if repo.startswith("s3://"):
        import fsspec.config

        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": os.environ["CKPTKIT_S3_ENDPOINT"]}}
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))  # env:// as under torchrun
    rank = int(os.environ["RANK"])
    assert int(os.environ["LOCAL_RANK"]) == rank and dist.get_world_size() == int(os.environ["WORLD_SIZE"])

    def checksum(m: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
        return float(sum(t.double().sum() for t in full(m, opt).values()))

    m = shard(build(k))
    opt = optimizer(m)
    state = {"model": m, "optimizer": opt}
    record: dict[str, Any] = {}
    r = Repository(repo)
    if rank == 0:
        names = r.list()
        referenced = {h for n in names for h in ckptkit.inspect(r, n).objects}
        record = {"names": names, "verified": [v.ok for v in ckptkit.verify(r)],
                  "orphans": len(set(r.list_objects()) - referenced)}  # fmt: skip
    if r.list():
        res = cd.load(repo, state)
        record.update(resumed=res.manifest.name, exact=res.fidelity.exact,
                      checksum_ok=checksum(m, opt) == res.manifest.metrics["checksum"])  # fmt: skip
    if rank == 0:
        with open(os.path.join(out, f"{tag}-trial-{k}.json"), "w") as f:
            json.dump(record, f)
    torch.manual_seed(100 + rank + k)
    step(m, opt)
    total = checksum(m, opt)
    if rank == victim:
        if point == "start":  # before this rank stores any object
            Repository.write_objects = lambda self, objects: _die()  # type: ignore[method-assign,assignment,return-value]
        elif point == "some":  # after its first object
            original = Repository.write_objects

            def write_then_die(self: Repository, objects: list[Any]) -> int:
                original(self, objects[:1])
                _die()
                return 0

            Repository.write_objects = write_then_die  # type: ignore[method-assign]
        elif point == "written":  # every object of this rank stored, its results not yet reported
            write_data = RepositoryWriter.write_data

            def written(self: RepositoryWriter, *args: Any) -> Any:
                write_data(self, *args)
                _die()

            RepositoryWriter.write_data = written  # type: ignore[method-assign]
        else:  # "commit": the coordinator, every rank's objects stored, just before the manifest
            Repository.commit = lambda self, name, manifest: _die()  # type: ignore[method-assign,assignment,return-value]
    cd.save(repo, state, f"c-{k}", metrics={"checksum": total})
    if victim >= 0:
        sys.exit(3)  # a survivor must not get here: the save cannot succeed without the victim


def _fork_ranks(k: int, job: Any) -> list[int]:
    """Run ``job()`` on 2 forked ranks started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT on a fresh port); their exit statuses. After a rank dies by SIGKILL the survivor gets
    3 s to fail by itself (its peer is gone), then is killed."""
    import socket
    import time
    import traceback

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pids = []
    for r in range(2):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))  # fmt: skip
            try:
                job()
            except SystemExit as err:
                os._exit(err.code if isinstance(err.code, int) else 1)
            except BaseException:
                traceback.print_exc()
                sys.stdout.flush()
                os._exit(1)
            sys.stdout.flush()
            os._exit(0)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < 2:
        if deadline is not None and time.monotonic() > deadline:
            for r, pid in enumerate(pids):
                if r not in codes:
                    os.kill(pid, signal.SIGKILL)
            deadline = None
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.01)
            continue
        codes[pids.index(pid)] = os.waitstatus_to_exitcode(status)
        if codes[pids.index(pid)] == -signal.SIGKILL and deadline is None:
            deadline = time.monotonic() + 3
    return [codes[0], codes[1]]


def suite(out: str, *jobs: str) -> None:
    """``test_distributed_ops.py`` in one process that imports torch once and forks every launch of 2 ranks:
    ``ops@REPO@RETAIN`` (:func:`ops`), then for each ``TAG@PLAN@URL`` the crash trials of ``PLAN``, a
    comma-separated list of ``clean`` or ``VICTIM:POINT``, one launch each (:func:`trial`). Each launch's exit
    statuses go to ``OUT/TAG-codes.json``."""
    import tempfile

    import torch.distributed as dist
    import torch.distributed.fsdp

    import ckptkit.distributed

    assert torch.distributed.fsdp and ckptkit.distributed  # imported once, before the forks
    if any("s3://" in j for j in jobs):
        import s3fs  # noqa: F401  (no filesystem, no event loop yet)

    # fully_shard's first call and forward import and initialize much (seconds): pay for it once, here, on a
    # one-rank group that is gone before the ranks are forked.
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        m = shard(build(0))
        with torch.no_grad():  # no backward: autograd's threads must not exist before a fork
            m(torch.zeros(1, 8))
        dist.destroy_process_group()
        del m

    def ops_rank(repo: str, retain: str) -> None:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        ops(repo, retain, out, dist.get_rank())
        dist.barrier()
        dist.destroy_process_group()

    for j in jobs:
        tag, a, b = j.split("@", 2)
        if tag == "ops":
            codes = [_fork_ranks(0, lambda: ops_rank(a, b))]  # noqa: B023  (called before the loop goes on)
        else:
            codes = []
            for k, item in enumerate(a.split(",")):
                victim, point = (-1, "") if item == "clean" else (int(item.split(":")[0]), item.split(":")[1])
                codes.append(_fork_ranks(k, functools.partial(trial, b, out, tag, k, victim, point)))
        with open(os.path.join(out, f"{tag}-codes.json"), "w") as f:
            json.dump(codes, f)


if __name__ == "__main__":
    if sys.argv[1] == "suite":
        suite(*sys.argv[2:])
    else:
        launch(int(sys.argv[1]), *sys.argv[2:])
