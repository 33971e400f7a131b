"""The AutoML shape: fit on data 1 under a step budget and save; later load the same predictor and fit on
data 2; if that fit collapses (the process dies), load with resume and finish it.

    python examples/automl.py ./checkpoints/automl fit1                 # data 1, budget 60 steps
    python examples/automl.py ./checkpoints/automl fit2 --crash-at 25   # data 2, dies at step 25 of 60
    python examples/automl.py ./checkpoints/automl resume               # finishes the fit on data 2
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

import torch

import ckptkit
from ckptkit.schema import DataSegment
from ckptkit.training import PlannedLR, ResumableLoader


def make_data(part: int, n: int = 256) -> torch.utils.data.TensorDataset:
    """Two disjoint samples of the same regression problem."""
    g = torch.Generator().manual_seed(100 + part)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.arange(1.0, 7.0).unsqueeze(1)) / 6 + 0.05 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class Predictor:
    """A small regressor whose every fit is checkpointed: save, load, fit on more data, resume a dead fit."""

    def __init__(self, url: str, data: torch.utils.data.Dataset[Any], steps: int, *, name: str = "data-1",
                 batch_size: int = 16) -> None:  # fmt: skip
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=5e-3)
        self.sched = PlannedLR(self.opt, total_steps=steps, warmup_steps=5)
        self.loader = ResumableLoader(data, batch_size, seed=1)
        self.steps = steps
        self.mgr = ckptkit.CheckpointManager(
            url, {"model": self.model, "optimizer": self.opt, "scheduler": self.sched, "loader": self.loader},
            every=5, retention=ckptkit.Retention(keep_last=2, keep_best=1, metric="loss"),
            data=DataSegment(name=name, size=len(self.loader.dataset)),  # type: ignore[arg-type]
        )  # fmt: skip
        self.step = 0
        self.samples = 0

    @classmethod
    def load(cls, url: str, data: torch.utils.data.Dataset[Any], steps: int, *, name: str,
             resume: bool = False) -> Predictor:  # fmt: skip
        """The saved predictor: ``resume=True`` finishes the interrupted fit, else a new fit on ``data``."""
        p = cls(url, data, steps, name=name)
        latest = p.mgr.latest()
        if latest is None:
            raise SystemExit(f"no saved predictor in {url}")
        if resume:
            result = p.mgr.restore()
            assert result is not None
            print(f"resumed {result.manifest.name} at step {result.progress.global_step}: {result.fidelity}")
        else:
            result = p.mgr.continue_from(new_data=DataSegment(name=name, size=len(data)),  # type: ignore[arg-type]
                                         schedule="restart", total_steps=latest.progress.global_step + steps,
                                         warmup_steps=5)  # fmt: skip
            print(f"loaded {result.manifest.name}; fitting on {name} for {steps} more steps")
        p.step, p.samples = result.progress.global_step, result.progress.samples_seen
        p.steps = p.sched.total_steps
        return p

    def fit(self, crash_at: int | None = None) -> float:
        """Train to the end of the plan; ``crash_at`` kills the process that many steps into this fit."""
        start = self.step
        loss = torch.tensor(float("nan"))
        while self.step < self.steps:
            for x, y in self.loader:
                loss = torch.nn.functional.mse_loss(self.model(x), y)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.sched.step()
                self.step += 1
                self.samples += len(x)
                self.mgr.save(self.step, epoch=self.loader.epoch, samples_seen=self.samples,
                              metrics={"loss": loss.item()}, force=self.step == self.steps)  # fmt: skip
                if crash_at is not None and self.step - start == crash_at:
                    print(f"collapse at step {self.step}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no final save
                if self.step >= self.steps:
                    break
        self.mgr.close()
        return loss.item()

    def evaluate(self, data: torch.utils.data.TensorDataset) -> float:
        x, y = data.tensors
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(self.model(x), y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("phase", choices=["fit1", "fit2", "resume"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--crash-at", type=int)
    a = ap.parse_args()
    test = make_data(9)
    start = time.perf_counter()
    if a.phase == "fit1":
        p = Predictor(a.url, make_data(1), a.steps, name="data-1")
        p.fit()
    else:
        p = Predictor.load(a.url, make_data(2), a.steps, name="data-2", resume=a.phase == "resume")
        p.fit(crash_at=a.crash_at)
    print(f"{a.phase}: step {p.step}, test mse {p.evaluate(test):.4f}, {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
