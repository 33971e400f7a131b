"""The pipeline shape: a non-torch preprocessing step fitted on the data (PCA, in numpy) feeding a torch MLP
head. Train; then change the number of epochs and the batch size and continue from where it stopped, with the
fitted PCA restored alongside the weights. Also: start from bare weight/optimizer files another tool wrote,
and continue from the latest checkpoint of a run.

    python examples/pipeline.py ./checkpoints/pipeline
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

import ckptkit
from ckptkit.training import PlannedLR, ResumableLoader


class PCA:
    """A preprocessing step fitted on the data (numpy, not torch). Stateful, so it is checkpointed too."""

    def __init__(self, components: int) -> None:
        self.k = components
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None

    def fit(self, x: np.ndarray) -> PCA:
        self.mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = vt[: self.k]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        assert self.mean is not None and self.basis is not None, "fit or restore the PCA first"
        return ((x - self.mean) @ self.basis.T).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "mean": self.mean, "basis": self.basis}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k, self.mean, self.basis = state["k"], state["mean"], state["basis"]


def raw_data(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, 3))
    x = latent @ rng.normal(size=(3, 20)) + 0.01 * rng.normal(size=(n, 20))
    y = (latent[:, :1] - 0.5 * latent[:, 1:2]).astype(np.float32)
    return x, y


class Features(torch.utils.data.Dataset[Any]):
    """Raw rows through the (fitted or restored) PCA, at read time: a restored PCA is what the head sees."""

    def __init__(self, pca: PCA, x: np.ndarray, y: np.ndarray) -> None:
        self.pca, self.x, self.y = pca, x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.pca.transform(self.x[i : i + 1])[0]), torch.from_numpy(self.y[i])


class Learner:
    """PCA -> MLP. ``fit(epochs)`` trains to that many epochs in all, resuming or continuing as needed."""

    def __init__(self, url: str, batch_size: int, pca: PCA | None = None) -> None:
        x, y = raw_data()
        self.pca = pca or PCA(4).fit(x)
        self.data = Features(self.pca, x, y)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.loader = ResumableLoader(self.data, batch_size, seed=0)
        self.sched = PlannedLR(self.opt, total_steps=10 * len(self.loader), warmup_steps=2)
        state = {"pca": self.pca, "model": self.model, "optimizer": self.opt, "scheduler": self.sched,
                 "loader": self.loader}  # fmt: skip
        self.mgr = ckptkit.CheckpointManager(url, state, every=10)
        self.step = 0
        self.samples = 0

    def fit(self, epochs: int) -> float:
        loss = torch.zeros(())
        while self.loader.epoch < epochs:
            for x, y in self.loader:
                loss = torch.nn.functional.mse_loss(self.model(x), y)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.sched.step()
                self.step += 1
                self.samples += len(x)
                self.mgr.save(self.step, epoch=self.loader.epoch, samples_seen=self.samples,
                              metrics={"loss": loss.item()})  # fmt: skip
        self.mgr.save(self.step, epoch=self.loader.epoch, samples_seen=self.samples, force=True,
                      name=f"epochs-{epochs}")  # fmt: skip
        return loss.item()

    def adopt(self, result: Any) -> None:
        self.step, self.samples = result.progress.global_step, result.progress.samples_seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", nargs="?", default="./checkpoints/pipeline")
    a = ap.parse_args()

    # 1. Train 3 epochs with batch size 32.
    first = Learner(a.url, batch_size=32)
    loss = first.fit(epochs=3)
    print(f"1. trained 3 epochs (batch 32): step {first.step}, loss {loss:.4f}, LR counter {first.sched.last_epoch}")

    # 2. Change epochs (3 -> 6) and batch size (32 -> 16); continue where it stopped. The PCA comes back fitted.
    blank = PCA(4)
    blank.mean, blank.basis = np.zeros(20), np.zeros((4, 20))  # deliberately wrong: the checkpoint must fix it
    second = Learner(a.url, batch_size=16, pca=blank)
    steps_left = (6 - 3) * len(second.loader)
    res = second.mgr.continue_from(schedule="extend", total_steps=first.step + steps_left,
                                   hparams={"epochs": 6, "batch_size": 16})  # fmt: skip
    second.adopt(res)
    assert np.array_equal(second.pca.basis, first.pca.basis), "PCA restored with the weights"
    assert second.sched.last_epoch == first.sched.last_epoch, "LR scheduler counters restored"
    loss = second.fit(epochs=6)
    edge = next(m for m in second.mgr.list() if m.lineage.relation == "continue").lineage.parents[0]
    print(f"2. continued to 6 epochs (batch 16): step {second.step}, loss {loss:.4f}; recorded: "
          f"{edge.relation} from {edge.name}, changes {sorted(edge.changes)}")  # fmt: skip

    # 3. Bare files from another tool: resume from this weights file and this optimizer file.
    tmp = tempfile.mkdtemp()
    torch.save(second.model.state_dict(), f"{tmp}/weights.pt")
    torch.save(second.opt.state_dict(), f"{tmp}/optimizer.pt")
    third = Learner(a.url + "-from-files", batch_size=16, pca=second.pca)
    report = third.mgr.start_from_files(f"{tmp}/weights.pt", f"{tmp}/optimizer.pt")
    shutil.rmtree(tmp)
    saved = third.mgr.save(0, force=True, name="imported")
    assert saved is not None
    print(f"3. started from bare files: {report}; saved {saved.name} with lineage {saved.lineage.relation}")

    # 4. Continue from the latest checkpoint of this run: two more epochs.
    fourth = Learner(a.url, batch_size=16)
    res = fourth.mgr.continue_from(schedule="constant", total_steps=second.step + 2 * len(fourth.loader))
    fourth.adopt(res)
    loss = fourth.fit(epochs=8)
    print(f"4. continued from the latest ({res.manifest.name}) to 8 epochs: loss {loss:.4f}")


if __name__ == "__main__":
    main()
