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
"""

from __future__ import annotations

import datetime
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


if __name__ == "__main__":
    launch(int(sys.argv[1]), *sys.argv[2:])
