"""Resume from bare files another tool wrote (the mlr3torch shape: ``t_clbk("resume", weights_path, optim_path,
epochs)``).

Another tool trains for some epochs and leaves only ``weights.pt`` and ``optimizer.pt``, plus the knowledge of how
many epochs it did. One call makes a checkpoint of them (every file checked first); a new process continues it
with its own, freshly built per-epoch scheduler, which ckptkit moves to the files' epoch.

    python examples/resume_bare_files.py ./checkpoints/files other-tool --epochs 6     # writes the bare files
    python examples/resume_bare_files.py ./checkpoints/files resume --epochs 6 --more 4

The same import from the command line (the optimizer's parameters are named by order, when that is certain):

    ckptkit import-files ./checkpoints/files ./checkpoints/files/weights.pt \
        --optimizer ./checkpoints/files/optimizer.pt --epoch 6 --step 48
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import ckptkit

STEPS_PER_EPOCH, BATCH = 8, 8


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # stepped once per epoch


def epoch_data(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of an epoch (a fixed order per epoch, as a seeded loader gives)."""
    g = torch.Generator().manual_seed(epoch)
    x = torch.randn(STEPS_PER_EPOCH * BATCH, 6, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
          epochs: range) -> list[float]:  # fmt: skip
    lrs = []
    for epoch in epochs:
        lrs.append(opt.param_groups[0]["lr"])
        x, y = epoch_data(epoch)
        for b in range(STEPS_PER_EPOCH):
            xb, yb = x[b * BATCH : (b + 1) * BATCH], y[b * BATCH : (b + 1) * BATCH]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
        sched.step()
    return lrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("command", choices=["other-tool", "resume"])
    ap.add_argument("--epochs", type=int, default=6, help="epochs the other tool did")
    ap.add_argument("--more", type=int, default=4, help="epochs to train after resuming")
    ap.add_argument("--report", help="write the LRs per epoch and the final weights' checksum (JSON) here")
    a = ap.parse_args()
    os.makedirs(a.url, exist_ok=True)
    weights, optim = os.path.join(a.url, "weights.pt"), os.path.join(a.url, "optimizer.pt")

    model, opt, sched = build()
    if a.command == "other-tool":  # another tool's loop: it keeps no scheduler state, only the two files
        train(model, opt, sched, range(a.epochs))
        torch.save(model.state_dict(), weights)
        torch.save(opt.state_dict(), optim)
        print(f"wrote {weights} and {optim} after {a.epochs} epochs")
        return

    m = ckptkit.import_files(a.url, weights, optimizer=optim, model=model, epoch=a.epochs,
                             step=a.epochs * STEPS_PER_EPOCH)  # fmt: skip
    with ckptkit.CheckpointManager(a.url, {"model": model, "optimizer": opt, "scheduler": sched}, rng=False,
                                   name_format="epoch-{epoch:04d}") as mgr:  # fmt: skip
        mgr.continue_from(m.name, position="epoch")  # the fresh StepLR is moved to epoch a.epochs
        lrs = train(model, opt, sched, range(a.epochs, a.epochs + a.more))
        last = mgr.save(step=(a.epochs + a.more) * STEPS_PER_EPOCH, epoch=a.epochs + a.more, force=True)
    assert last is not None
    print(f"{m.name} -> {last.name}: LR per epoch {lrs}, lineage {last.lineage.relation} <- "
          f"{last.lineage.parents[0].name}")  # fmt: skip
    if a.report:
        with open(a.report, "w") as fh:
            json.dump({"lrs": lrs, "checkpoint": last.name}, fh)


if __name__ == "__main__":
    main()
