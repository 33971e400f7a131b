"""`ckptkit demo`: train a tiny model, checkpoint, SIGKILL it, resume, and compare with an uninterrupted run.

The training worker is an ordinary loop with the handful of lines ckptkit asks for; it runs in a subprocess
so the kill is real. Run the worker alone with ``python -m ckptkit.demo URL --steps N``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import subprocess
import sys
import time

import torch

import ckptkit
from ckptkit.api import checkpoints, restore, verify

DATASET = 512
BATCH = 32


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The demo's model, optimizer and schedule (same seed, same initial weights)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    return model, opt, sched


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(DATASET, 16, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(DATASET, 1, generator=g)
    return x, y


def train(url: str, steps: int, every: int, delay: float) -> None:
    """The worker: a plain loop plus ckptkit's few lines (manager, restore, save)."""
    model, opt, sched = build()
    x, y = data()
    per_epoch = DATASET // BATCH
    mgr = ckptkit.CheckpointManager(url, {"model": model, "optimizer": opt, "scheduler": sched},
                                    every=every, retention=ckptkit.Retention(keep_last=3),
                                    hparams={"lr": 3e-3, "batch_size": BATCH})  # fmt: skip
    resumed = mgr.restore()  # None on a fresh run
    start = resumed.progress.global_step if resumed else 0
    if resumed:
        print(f"worker: resumed from {resumed.manifest.name} at step {start}", flush=True)
    for step in range(start + 1, steps + 1):
        epoch, pos = divmod(step - 1, per_epoch)
        # Data order depends only on (seed, epoch), so a resumed run reads the same batches.
        order = torch.randperm(DATASET, generator=torch.Generator().manual_seed(epoch))
        idx = order[pos * BATCH : (pos + 1) * BATCH]
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        mgr.save(step, epoch=epoch, step_in_epoch=pos + 1, samples_seen=step * BATCH,
                 metrics={"loss": loss.item()}, force=step == steps)  # fmt: skip
        time.sleep(delay)
    mgr.close()
    print(f"worker: finished step {steps}", flush=True)


def _worker(url: str, steps: int, every: int, delay: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "ckptkit.demo", url, "--steps", str(steps), "--every", str(every),
           "--delay", str(delay)]  # fmt: skip
    return subprocess.Popen(cmd)


def run_demo(base: str, steps: int = 60) -> int:
    """Run the demo under ``base``; return 0 when the resumed run matches the uninterrupted one bit for bit."""
    if steps < 20:
        raise ValueError("the demo needs at least 20 steps")
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
    bad = [r for r in verify(run_url) if not r.ok]
    print(f"5. verify {run_url}: {bad if bad else 'ok'}")
    print(f"   see it yourself: ckptkit ls {run_url}   |   ckptkit show {run_url}")
    return 0 if exact and not bad else 1


def _final(url: str) -> dict[str, torch.Tensor]:
    model, opt, sched = build(seed=99)  # different init: everything must come from the checkpoint
    restore(url, {"model": model, "optimizer": opt, "scheduler": sched}, rng=False)
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items()})
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("url")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args()
    train(a.url, a.steps, a.every, a.delay)
