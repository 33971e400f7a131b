"""A plain PyTorch training loop with ckptkit: the lines marked `# ckptkit` are all it takes.

Run it, interrupt it (Ctrl-C, kill -9, a preemption), run it again: it resumes from the latest checkpoint.

    python examples/plain_loop.py ./checkpoints/plain --steps 200
"""

from __future__ import annotations

import argparse

import torch

import ckptkit

p = argparse.ArgumentParser()
p.add_argument("url", nargs="?", default="./checkpoints/plain")
p.add_argument("--steps", type=int, default=200)
args = p.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

mgr = ckptkit.CheckpointManager(  # ckptkit
    args.url,
    {"model": model, "optimizer": opt, "scheduler": sched},
    every=50,
    retention=ckptkit.Retention(keep_last=2, keep_best=1, metric="loss"),
)
resumed = mgr.restore()  # ckptkit: None on a fresh run
start = resumed.progress.global_step if resumed else 0
print(f"starting at step {start}" + (f" (resumed from {resumed.manifest.name})" if resumed else ""))

for step in range(start + 1, args.steps + 1):
    x = torch.randn(64, 10)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    mgr.save(step, metrics={"loss": loss.item()})  # ckptkit: writes every 50 steps, prunes old ones

mgr.close()  # ckptkit
print(f"done at step {args.steps}; checkpoints: {[m.name for m in mgr.list()]}")
