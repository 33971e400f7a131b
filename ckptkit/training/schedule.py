"""An LR schedule that can be re-planned when a run is continued.

``PlannedLR`` is a torch LR scheduler (warmup, then cosine / linear / constant decay) whose plan is a list of
segments saved with the checkpoint. Continuing a run appends a segment by a named policy:

- ``extend``: the same decay shape stretched to the new total, starting at the current position, so the first LR
  of the new segment equals the LR in effect when the old one stopped (no jump);
- ``restart``: a fresh warmup and decay from the current weights, peaking at the (possibly new) base LR;
- ``constant``: hold an LR (the current one, or a new one) until the new total.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from ckptkit.errors import InvalidArgumentError

__all__ = ["Decay", "PlannedLR", "Policy"]

Policy = Literal["extend", "restart", "constant"]
Decay = Literal["cosine", "linear", "constant"]


def _curve(decay: str, u: float, floor: float) -> float:
    u = min(max(u, 0.0), 1.0)
    if decay == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * u))
    if decay == "linear":
        return floor + (1.0 - floor) * (1.0 - u)
    return 1.0


class PlannedLR(torch.optim.lr_scheduler.LRScheduler):
    """Warmup then decay, re-plannable by :meth:`replan` (what ``CheckpointManager.continue_from`` calls).

    Args:
        optimizer: the optimizer whose groups' LRs are scheduled (each group's base LR is its initial LR).
        total_steps: optimizer steps of the plan.
        warmup_steps: linear warmup from ``base_lr / warmup_steps`` to ``base_lr``.
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` after warmup.
        min_lr_ratio: the LR at the end of the decay, as a fraction of the base LR.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = PlannedLR(opt, total_steps=10, warmup_steps=2)
        >>> [round(sched.lr_at(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        decay: Decay = "cosine",
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check_plan(total_steps, warmup_steps, decay, min_lr_ratio, start=0)
        self.segments: list[dict[str, Any]] = [
            {"start": 0, "end": total_steps, "warmup": warmup_steps, "decay": decay, "floor": min_lr_ratio,
             "u0": 0.0, "scale": 1.0, "policy": "init"}
        ]
        super().__init__(optimizer, last_epoch)

    @property
    def total_steps(self) -> int:
        """The end of the current plan, in optimizer steps."""
        return int(self.segments[-1]["end"])

    def factor(self, step: int) -> float:
        """The LR at ``step`` as a fraction of the base LR."""
        seg = next(s for s in reversed(self.segments) if s["start"] <= step or s is self.segments[0])
        t = step - seg["start"]
        if t < seg["warmup"]:
            return float(seg["scale"] * (t + 1) / seg["warmup"])
        span = max(1, seg["end"] - seg["start"] - seg["warmup"])
        u = seg["u0"] + (1.0 - seg["u0"]) * (t - seg["warmup"]) / span
        return float(seg["scale"] * _curve(seg["decay"], u, seg["floor"]))

    def lr_at(self, step: int, group: int = 0) -> float:
        """The LR of param group ``group`` at ``step``."""
        return float(self.base_lrs[group]) * self.factor(step)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(self.last_epoch)
        return [float(base) * f for base in self.base_lrs]

    def replan(
        self, policy: Policy, total_steps: int, *, warmup_steps: int = 0, lr: float | None = None
    ) -> dict[str, Any]:
        """Append a segment from the current step to ``total_steps`` by ``policy``; returns what changed.

        Raises:
            ValueError: a total that does not lie ahead of the current step, an unknown policy, or ``lr`` with
                ``extend`` (which keeps the LR continuous by definition).
        """
        step = max(self.last_epoch, 0)
        if policy not in ("extend", "restart", "constant"):
            raise InvalidArgumentError(f"unknown schedule policy {policy!r}: use 'extend', 'restart' or 'constant'")
        last = self.segments[-1]
        _check_plan(total_steps, warmup_steps, last["decay"], last["floor"], start=step)
        before = {"total_steps": self.total_steps, "lr": [float(g["lr"]) for g in self.optimizer.param_groups]}
        if policy == "extend":
            if lr is not None:
                raise InvalidArgumentError("schedule 'extend' keeps the LR continuous; to set a new LR use 'restart' "
                                           "or 'constant'")
            if warmup_steps:
                raise InvalidArgumentError("schedule 'extend' continues the current shape; warmup_steps apply to "
                                           "'restart'")
            seg = self._extend(step, total_steps)
        elif policy == "restart":
            if lr is not None:
                self._set_base_lr(lr)
            seg = {**last, "start": step, "end": total_steps, "warmup": warmup_steps, "u0": 0.0, "scale": 1.0}
        else:
            scale = self.factor(step) if lr is None else 1.0
            if lr is not None:
                self._set_base_lr(lr)
            seg = {**last, "start": step, "end": total_steps, "warmup": 0, "decay": "constant", "u0": 0.0,
                   "scale": scale}  # fmt: skip
        seg["policy"] = policy
        self.segments = [s for s in self.segments if s["start"] < step] + [seg]
        lrs = self.get_lr()
        for group, value in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = value
        self._last_lr = list[float | torch.Tensor](lrs)
        return {"schedule": policy, "total_steps": [before["total_steps"], total_steps],
                "lr": [before["lr"], lrs]}  # fmt: skip

    def _extend(self, step: int, total: int) -> dict[str, Any]:
        seg = next(s for s in reversed(self.segments) if s["start"] <= step or s is self.segments[0])
        t = step - seg["start"]
        if t < seg["warmup"]:  # still warming up: keep the warmup, stretch the decay after it
            return {**seg, "end": total}
        span = max(1, seg["end"] - seg["start"] - seg["warmup"])
        u = min(1.0, seg["u0"] + (1.0 - seg["u0"]) * (t - seg["warmup"]) / span)
        return {**seg, "start": step, "end": total, "warmup": 0, "u0": u}

    def _set_base_lr(self, lr: float) -> None:
        if not lr > 0:
            raise InvalidArgumentError(f"lr must be positive, got {lr}")
        self.base_lrs = [float(lr)] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = float(lr)


def _check_plan(total: int, warmup: int, decay: str, floor: float, start: int) -> None:
    if not isinstance(total, int) or total <= start:
        raise InvalidArgumentError(f"total_steps must be an integer after the current step {start}, got {total!r}")
    if not isinstance(warmup, int) or warmup < 0 or warmup >= total - start:
        raise InvalidArgumentError(f"warmup_steps must be in [0, {total - start}), got {warmup!r}")
    if decay not in ("cosine", "linear", "constant"):
        raise InvalidArgumentError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
    if not 0.0 <= floor <= 1.0:
        raise InvalidArgumentError(f"min_lr_ratio must be in [0, 1], got {floor}")
