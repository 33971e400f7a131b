"""A tiny model with tied weights, trained a few AdamW + StepLR steps: what the hostile-manifest and fuzz tests
forge checkpoints from (tied weights give aliases, AdamW moments, a scheduler: every kind of state to attack)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Tied(torch.nn.Module):
    """Two layers sharing one weight: the manifest stores it once and records the other name as an alias."""

    def __init__(self, with_buffer: bool = False) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(4, 4)
        self.dec = torch.nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        if with_buffer:
            self.register_buffer("count", torch.tensor(3, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


def trained(
    seed: int, lr: float, with_buffer: bool = False
) -> tuple[Tied, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The model, its optimizer and its scheduler after two training steps from ``seed``."""
    torch.manual_seed(seed)
    model = Tied(with_buffer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for _ in range(2):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def same_bits(a: Any, b: Any) -> bool:
    """Equal bit for bit (tensors and arrays by their bytes, NaN equal to NaN), containers of the same types."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))  # fmt: skip
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and (a == b or (a != a and b != b))  # noqa: PLR0124 - NaN equals NaN here
