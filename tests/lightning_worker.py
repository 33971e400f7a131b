"""A tiny Lightning run used by tests/test_lightning_plugin.py, in the test process and in subprocesses.

    python tests/lightning_worker.py URL OUT [--resume] [--slow SECONDS]

trains through ``CkptkitCheckpointIO(URL)`` with ``ModelCheckpoint(every_n_train_steps=EVERY)`` (one save per epoch
end), prints ``SAVED <name>`` after each commit, resumes with ``fit(ckpt_path=io.latest())`` when ``--resume``
(printing ``RESUMED <name>``), and writes the final weights to OUT.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckptkit.integrations.lightning import CkptkitCheckpointIO, ProcessRNG

N, BATCH, EPOCHS = 16, 4, 3
EVERY = N // BATCH  # batches (= optimizer steps) per epoch: every save is at an epoch end


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, noisy: bool = True, slow: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["slow"])
        self.slow = slow
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3 if noisy else 0.0),
                                       torch.nn.Linear(8, 1))

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        if self.slow:
            time.sleep(self.slow)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(noisy: bool) -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(N, 4, generator=g), torch.randn(N, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=noisy, num_workers=0)


def weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def fit(
    root: str,
    *,
    plugin: Any = None,
    ckpt_path: Any = None,
    noisy: bool = True,
    rng: bool = True,
    save: bool = True,
    epochs: int = EPOCHS,
    slow: float = 0.0,
    **checkpoint: Any,
) -> tuple[L.Trainer, Tiny]:
    """One fit, seeded the same way in every process; ``plugin=None`` is Lightning's own .ckpt files."""
    L.seed_everything(0, verbose=False)
    module = Tiny(noisy=noisy, slow=slow)
    callbacks: list[Any] = [ProcessRNG()] if rng else []
    if save:
        callbacks.append(ModelCheckpoint(dirpath=f"{root}/ckpts", every_n_train_steps=EVERY,
                                         **({"save_top_k": -1} | checkpoint)))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False, logger=False,
                        enable_model_summary=False, enable_checkpointing=save, callbacks=callbacks,
                        plugins=[plugin] if plugin is not None else None, default_root_dir=root)
    trainer.fit(module, loader(noisy), ckpt_path=ckpt_path)
    return trainer, module


class Printing(CkptkitCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        print("SAVED", self.name_of(path), flush=True)


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow", type=float, default=0.0)
    a = p.parse_args()
    io = Printing(a.url)
    start = io.latest() if a.resume else None
    if a.resume:
        print("RESUMED", start, flush=True)
    root = str(Path(a.out).parent)
    _, module = fit(root, plugin=io, ckpt_path=start, slow=a.slow)
    torch.save(weights(module), a.out)
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
