"""`ckptkit demo`: train a tiny model, checkpoint, SIGKILL it, resume, and compare with an uninterrupted run.

The training worker is an ordinary loop with the handful of lines ckptkit asks for; it runs in a subprocess
so the kill is real. Run the worker alone with ``python -m ckptkit.cli.demo URL --steps N``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from typing import Any

import torch

import ckptkit
from ckptkit.api import checkpoints, restore, verify
from ckptkit.errors import InvalidArgumentError
from ckptkit.history.chain import verify_chain
from ckptkit.history.graph import history
from ckptkit.history.render import render
from ckptkit.schema import DataSegment
from ckptkit.training.fingerprints import fingerprint
from ckptkit.training.loader import ResumableLoader
from ckptkit.training.schedule import PlannedLR

__all__ = ["run_demo"]

DATASET = 512
BATCH = 32


def build(seed: int = 0, steps: int = 60, batch: int = BATCH) -> dict[str, Any]:
    """The demo's state: model, optimizer, warmup+cosine schedule and a resumable loader (same seed, same run)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = PlannedLR(opt, total_steps=steps, warmup_steps=5, min_lr_ratio=0.05)
    loader = ResumableLoader(Noisy(*data()), batch, seed=1)
    return {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}


class Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Samples with random augmentation (noise), drawn from the RNG ckptkit seeds per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.05 * torch.randn(16), self.y[i]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(DATASET, 16, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(DATASET, 1, generator=g)
    return x, y


def segment() -> DataSegment:
    """The demo's dataset as the data manifest records it: name, fingerprint of its content, size, split."""
    x, y = data()
    return DataSegment(name="noisy-regression", uri="ckptkit-demo://noisy-regression", split="train",
                       fingerprint=fingerprint(torch.utils.data.TensorDataset(x, y)), size=DATASET)  # fmt: skip


def loop(state: dict[str, Any], mgr: ckptkit.CheckpointManager, step: int, steps: int, delay: float) -> int:
    """A plain training loop; the only ckptkit line is ``mgr.save``."""
    model, opt, sched, loader = state["model"], state["optimizer"], state["scheduler"], state["loader"]
    while step < steps:
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            step += 1
            mgr.save(step, epoch=loader.epoch, step_in_epoch=loader.batches_in_epoch,
                     samples_seen=step * loader.batch_size, metrics={"loss": loss.item()},
                     force=step == steps)  # fmt: skip
            time.sleep(delay)
            if step >= steps:
                break
    return step


def train(url: str, steps: int, every: int, delay: float) -> None:
    """The worker: build, restore if there is anything to restore, train, save every ``every`` steps."""
    state = build(steps=steps)
    mgr = ckptkit.CheckpointManager(url, state, every=every, retention=ckptkit.Retention(keep_last=3),
                                    hparams={"lr": 3e-3, "batch_size": BATCH}, data=segment())  # fmt: skip
    resumed = mgr.restore()  # None on a fresh run
    start = resumed.progress.global_step if resumed else 0
    if resumed:
        print(f"worker: resumed from {resumed.manifest.name} at step {start} ({resumed.fidelity})", flush=True)
    loop(state, mgr, start, steps, delay)
    mgr.close()
    print(f"worker: finished step {steps}", flush=True)


def _worker(url: str, steps: int, every: int, delay: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "ckptkit.cli.demo", url, "--steps", str(steps), "--every", str(every),
           "--delay", str(delay)]  # fmt: skip
    return subprocess.Popen(cmd)


def run_demo(base: str, steps: int = 60) -> int:
    """Run the demo under ``base``; return 0 when the resumed run matches the uninterrupted one bit for bit."""
    if steps < 20:
        raise InvalidArgumentError(f"--steps {steps}: the demo needs at least 20 steps")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_url = f"{base.rstrip('/')}/run-{stamp}"
    ref_url = f"{base.rstrip('/')}/reference-{stamp}"
    print(f"1. uninterrupted reference run ({steps} steps) -> {ref_url}")
    if _worker(ref_url, steps, steps, 0.0).wait() != 0:
        return 1
    kill_after = steps // 2
    print(f"2. training run -> {run_url}, checkpoint every 5 steps; SIGKILL once step {kill_after} is saved")
    proc = _worker(run_url, steps, 5, 0.05)
    while proc.poll() is None:
        found = checkpoints(run_url)
        if found and found[-1].progress.global_step >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.02)
    latest = checkpoints(run_url)[-1]
    print(f"   killed (exit {proc.returncode}); latest committed checkpoint: {latest.name}")
    print("3. same command again: it restores the latest checkpoint and trains to the end")
    if _worker(run_url, steps, 5, 0.0).wait() != 0:
        return 1
    print("4. compare final weights and optimizer state with the uninterrupted run")
    ref = _final(ref_url)
    got = _final(run_url)
    exact = all(torch.equal(ref[k], got[k]) for k in ref) and ref.keys() == got.keys()
    print(f"   {len(ref)} tensors, bit-exact: {'yes' if exact else 'NO'}")
    print("5. continue the finished run: 20 more steps, batch size 32 -> 64, LR schedule 'restart' (a new warmup "
          "and decay; 'extend' would hold the finished schedule's final LR)")
    state = build(steps=steps, batch=2 * BATCH)
    mgr = ckptkit.CheckpointManager(run_url, state, hparams={"lr": 3e-3, "batch_size": 2 * BATCH}, data=segment())
    res = mgr.continue_from(schedule="restart", total_steps=steps + 20, warmup_steps=4,
                            hparams={"lr": 3e-3, "batch_size": 2 * BATCH})  # fmt: skip
    sched = state["scheduler"]
    end = loop(state, mgr, res.progress.global_step, steps + 20, 0.0)
    lrs = ", ".join(f"{sched.lr_at(s):.1e}" for s in (steps, steps + 3, steps + 10, end))
    print(f"   LR at steps {steps}, {steps + 3}, {steps + 10}, {end}: {lrs} (restored at {sched.lr_at(steps - 1):.1e})")
    edge = next(m for m in mgr.list() if m.lineage.relation == "continue").lineage.parents[0]
    print(f"   lineage: continue from {edge.name}, changes: {', '.join(sorted(edge.changes))}")
    print("6. transfer: the regression model's body into a 3-class classifier (a new head)")
    cls_url = f"{base.rstrip('/')}/classifier-{stamp}"
    torch.manual_seed(7)
    classifier = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 3)
    )
    cmgr = ckptkit.CheckpointManager(cls_url, {"model": classifier})
    plan = cmgr.transfer_from(run_url)
    for key, p in plan.tensors.items():
        print(f"   {key:10s} {p.action:13s} {list(p.source_shape or [])} -> {list(p.target_shape)}")
    saved = cmgr.save(0, force=True)
    assert saved is not None
    print(f"   {cls_url}: lineage {saved.lineage.relation} from {saved.lineage.parents[0].name} ({run_url})")
    bad = [r for r in verify(run_url) if not r.ok]
    chain = verify_chain(cls_url)
    print(f"7. verify {run_url}: {bad if bad else 'ok'}; the classifier's whole history: "
          f"{'ok' if chain.ok else chain.problems} ({chain.checked} checkpoints)")
    print("8. lineage of the model this demo produced (newest first; archived = pruned by retention, manifest kept):")
    for line in render(history(cls_url), "text").splitlines():
        print(f"   {line}")
    print(f"   see it yourself: ckptkit log {cls_url}   |   ckptkit audit {cls_url} --html audit.html")
    return 0 if exact and not bad else 1


def _final(url: str) -> dict[str, torch.Tensor]:
    state = build(seed=99)  # different init: everything must come from the checkpoint
    restore(url, state, f"step-{_final_step(url):08d}", rng=False)
    out = {f"model.{k}": v for k, v in state["model"].state_dict().items()}
    for i, s in state["optimizer"].state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items()})
    return out


def _final_step(url: str) -> int:
    return max(m.progress.global_step for m in checkpoints(url))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("url")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args()
    train(a.url, a.steps, a.every, a.delay)
