"""An Accelerate training loop that saves and resumes through ckptkit's AcceleratorCheckpoint (run by
tests/test_accelerate.py, SIGKILLed mid-training, resumed in a fresh process, compared with an uninterrupted run).

What it holds: dropout (global torch RNG), a shuffled prepared DataLoader with its own generator, AdamW, LinearLR
stepped through accelerate's scheduler wrapper, gradient accumulation (accelerator.accumulate), and an object given
to register_for_checkpointing.

    python tests/accelerate_worker.py --serve URL   # a fork server (tests/forkserver.py): one run per "go"
    python tests/accelerate_worker.py --saver URL   # one run

A run restores the latest checkpoint of URL (printing ``resumed <step> <fidelity>``), prints ``ready <step>``,
``committed <step>`` after each committed save (a fresh run pauses after each step, so a kill lands mid-training),
and at the end writes the final state to ``URL-final.pt`` (torch.save of a dict of tensors) and prints ``done``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ckptkit.integrations.accelerate import AcceleratorCheckpoint

N, BATCH, ACCUM, EPOCHS = 32, 4, 2, 3
TOTAL = N // BATCH // ACCUM * EPOCHS  # optimizer steps


class Tally:
    """A registered object: an int and a tensor, both part of the run's state."""

    def __init__(self) -> None:
        self.steps = 0
        self.loss_sum = torch.zeros(1, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "loss_sum": self.loss_sum.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.loss_sum = state["loss_sum"].clone()


def make_model() -> torch.nn.Module:
    """The architecture (also ``ckptkit import --model accelerate_worker:make_model``)."""
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))


def build(accum: int = ACCUM) -> tuple[Any, ...]:
    """A fresh Accelerator and prepared objects (the same in every process)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(0)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=TOTAL)
    g = torch.Generator().manual_seed(7)
    ds = torch.utils.data.TensorDataset(torch.randn(N, 6, generator=g), torch.randn(N, 2, generator=g))
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    tally = Tally()
    acc.register_for_checkpointing(tally)
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    return acc, model, opt, dl, sched, tally


def final_state(model: torch.nn.Module, opt: Any, sched: Any, tally: Tally) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
    out["lr"] = torch.tensor(sched.get_last_lr())
    out["tally.steps"] = torch.tensor(tally.steps)
    out["tally.loss_sum"] = tally.loss_sum.clone()
    out["next_random"] = torch.rand(4)  # the process RNG after the run: dropout streams continue the same
    return out


def train(url: str, every: int, pause: float | None = None) -> dict[str, torch.Tensor]:
    """Run (or resume) to the end; ``pause`` seconds after each step (default: 0.3 on a fresh run, 0 on a resume)."""
    acc, model, opt, dl, sched, tally = build()
    ckpt = AcceleratorCheckpoint(acc, url, every=every)
    resumed = ckpt.restore()
    step = resumed.progress.global_step if resumed else 0
    if resumed is not None:
        print("resumed", step, resumed.fidelity, flush=True)
    if pause is None:
        pause = 0.3 if resumed is None else 0.0
    print("ready", step, flush=True)
    batches = ckpt.loader(dl)
    while step < TOTAL:
        for x, y in batches:
            with acc.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            if acc.sync_gradients:  # an optimizer step: the only place a save is consistent
                step += 1
                tally.steps += 1
                tally.loss_sum += loss.detach().double()
                if ckpt.save(step) is not None:
                    print("committed", step, flush=True)
                time.sleep(pause)
    ckpt.close()
    return final_state(model, opt, sched, tally)


def saver(url: str) -> None:
    torch.save(train(url, every=2), f"{url}-final.pt")
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--saver":
        saver(sys.argv[2])
    else:  # --serve: import everything once; each run is a forked process that starts instantly
        import accelerate.accelerator
        import accelerate.utils  # noqa: F401
        import forkserver

        forkserver.serve(sys.argv[2], saver, [sys.executable, __file__, "--saver", sys.argv[2]])
