"""The deterministic state behind the golden checkpoints (values from arange, no RNG)."""

from __future__ import annotations

from typing import Any

import torch


class Golden(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("bf16", torch.zeros(3, dtype=torch.bfloat16))


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    model = Golden()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)
    return model, opt, sched, torch.amp.GradScaler("cpu", init_scale=256.0)


def fill(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: torch.amp.GradScaler) -> None:
    """Give every tensor a known value (what the golden checkpoint must restore to)."""
    with torch.no_grad():
        for i, (_, t) in enumerate(sorted(model.state_dict().items())):
            if t.is_floating_point():
                t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) / (i + 1))
            else:
                t.fill_(i)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    scaler.scale(torch.ones(()))  # initialises the scale tensor
    scaler.update(128.0)
