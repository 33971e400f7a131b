"""A realistic training loop used by the resume tests: run, SIGKILL at any moment, run again, compare.

Everything that makes exact resume hard is here: dropout, a shuffled loader with 2 workers and random
augmentation inside the dataset, AdamW with warmup + cosine, gradient accumulation, GradScaler with bf16
autocast on CPU, and an EMA of the weights kept as a Stateful object.

    python tests/resume_worker.py URL --model mlp|bert|timm --loader resumable|position|stateful [--slow-save N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

import numpy as np
import torch

import ckptkit
from ckptkit.storage import Repository
from ckptkit.training import LoaderPosition, PlannedLR, ResumableLoader, WorkerRNG

N, BATCH, ACCUM, EPOCHS = 40, 4, 2, 3
STEPS_PER_EPOCH = N // BATCH // ACCUM  # optimizer steps
TOTAL = STEPS_PER_EPOCH * EPOCHS


class Data(torch.utils.data.Dataset[Any]):
    """Fixed samples; every read applies random augmentation from the worker's python/numpy/torch RNG."""

    def __init__(self, kind: str) -> None:
        g = torch.Generator().manual_seed(7)
        self.kind = kind
        if kind == "bert":
            self.x = torch.randint(5, 100, (N, 12), generator=g)
        elif kind == "timm":
            self.x = torch.randn(N, 3, 16, 16, generator=g)
        else:
            self.x = torch.randn(N, 8, generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i].clone()
        if self.kind == "bert":
            x[torch.rand(x.shape) < 0.15] = 4  # random masking
        else:
            x = x + 0.1 * torch.randn_like(x) + float(np.random.normal(0, 0.05))
            if random.random() < 0.5:
                x = x.flip(-1)
        return x, self.y[i]


def build_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, num_labels=3)  # fmt: skip
        return BertForSequenceClassification(cfg)
    if kind == "timm":
        import timm

        return timm.create_model("resnet10t", pretrained=False, num_classes=3, drop_rate=0.2)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 3))


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9) -> None:
        self.model, self.decay = model, decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, v in self.model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
        self.decay = state["decay"]


def build(kind: str, loader_kind: str) -> dict[str, Any]:
    model = build_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = PlannedLR(opt, total_steps=TOTAL, warmup_steps=3)
    data = Data(kind)
    loader: Any
    if loader_kind == "resumable":
        loader = ResumableLoader(data, BATCH, seed=11, num_workers=2)
    elif loader_kind == "position":
        dl = torch.utils.data.DataLoader(data, BATCH, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(11))  # fmt: skip
        loader = LoaderPosition(dl)
    else:
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader = StatefulDataLoader(WorkerRNG(data), batch_size=BATCH, shuffle=True, num_workers=2,
                                    snapshot_every_n_steps=1, generator=torch.Generator().manual_seed(11))  # fmt: skip
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": torch.amp.GradScaler("cpu"),
            "ema": EMA(model), "loader": loader}  # fmt: skip


def forward(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "bert":
        return model(input_ids=x, labels=y).loss  # type: ignore[no-any-return]
    return torch.nn.functional.cross_entropy(model(x), y)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--model", default="mlp")
    p.add_argument("--loader", default="resumable")
    p.add_argument("--slow-save", type=int, default=-1, help="sleep inside the save of this step (to be killed)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.model == "timm":
        # oneDNN's bf16 convolutions differ from process to process on this CPU even with
        # torch.use_deterministic_algorithms(True) (two uninterrupted runs disagree), so no resume could match.
        torch.backends.mkldnn.enabled = False
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = build(a.model, a.loader)
    model, opt, sched, scaler, ema, loader = (state[k] for k in ("model", "optimizer", "scheduler", "scaler", "ema", "loader"))
    if a.slow_save >= 0:
        real_commit = Repository.commit

        def slow_commit(self: Repository, name: str, manifest: bytes) -> None:
            if name == f"step-{a.slow_save:08d}":
                print(f"SAVING {a.slow_save}", flush=True)  # objects written, manifest not yet: kill me now
                time.sleep(60)
            real_commit(self, name, manifest)

        Repository.commit = slow_commit  # type: ignore[method-assign]
    mgr = ckptkit.CheckpointManager(a.url, state, every=1, retention=ckptkit.Retention(keep_last=4))
    resumed = mgr.restore()
    step = resumed.progress.global_step if resumed else 0
    if resumed:
        print(f"RESUMED {resumed.manifest.name} fidelity: {resumed.fidelity}", flush=True)
    model.train()
    while step < TOTAL:
        micro = 0
        epoch_before = getattr(loader, "epoch", step // STEPS_PER_EPOCH)
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(a.model, model, x, y) / ACCUM
            scaler.scale(loss).backward()
            micro += 1
            if micro % ACCUM:
                continue
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            ema.update()
            step += 1
            mgr.save(step, epoch=(step - 1) // STEPS_PER_EPOCH, samples_seen=step * BATCH * ACCUM,
                     metrics={"loss": float(loss) * ACCUM})  # fmt: skip
            print(f"STEP {step}", flush=True)
            if step >= TOTAL:
                break
        del epoch_before
    mgr.save(step, force=True, name="final")
    print("DONE", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
