"""Continue planning: what a ``continue_from`` changes (optimizer hyperparameters, the LR plan, batch size,
hyperparameters, data) and the record of each change for the lineage edge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.errors import ArgumentTypeError, InvalidArgumentError
from ckptkit.schema import DataSegment, Manifest
from ckptkit.training.loader import ResumableLoader
from ckptkit.training.schedule import PlannedLR, Policy

__all__ = ["apply_changes", "check_continue", "hparams_diff"]


def check_continue(
    state: Mapping[str, object], schedule: Policy | None, total_steps: int | None, new_data: DataSegment | None
) -> PlannedLR | None:
    """Validate a continue's options before anything is restored; the schedule to re-plan, if any."""
    if (schedule is None) != (total_steps is None):
        raise InvalidArgumentError("continue_from: give schedule= and total_steps= together (e.g. "
                                   "schedule='extend', total_steps=2000)")  # fmt: skip
    planned = [o for o in state.values() if isinstance(o, PlannedLR)]
    if schedule is not None and len(planned) != 1:
        raise InvalidArgumentError(
            f"continue_from(schedule={schedule!r}) re-plans a ckptkit.training.PlannedLR, and the managed state "
            f"has {len(planned)}; use PlannedLR, or build your new scheduler yourself and leave schedule=None"
        )
    if new_data is not None and not isinstance(new_data, DataSegment):
        raise ArgumentTypeError(f"new_data must be a ckptkit.schema.DataSegment, got {type(new_data).__name__}")
    return planned[0] if schedule is not None else None


def apply_changes(
    state: Mapping[str, object],
    m: Manifest,
    *,
    planned: PlannedLR | None,
    schedule: Policy | None,
    total_steps: int | None,
    warmup_steps: int,
    lr: float | None,
    optimizer_hparams: Mapping[str, Any] | None,
    new_data: DataSegment | None,
) -> dict[str, Any]:
    """Apply a continue's changes to the restored live objects; return what changed, ``[before, after]``."""
    changes: dict[str, Any] = {}
    opts = [o for o in state.values() if isinstance(o, torch.optim.Optimizer)]
    updates = {**(optimizer_hparams or {}), **({"lr": lr} if lr is not None and schedule is None else {})}
    for key, value in updates.items():
        for opt in opts:
            before = [g.get(key) for g in opt.param_groups]
            for g in opt.param_groups:
                g[key] = value
            changes[f"optimizer.{key}"] = [before[0] if len(set(map(repr, before))) == 1 else before, value]
    if planned is not None and schedule is not None and total_steps is not None:
        changes.update(planned.replan(schedule, total_steps, warmup_steps=warmup_steps, lr=lr))
    for n, obj in state.items():
        saved_state = m.components[n].state if n in m.components else None
        if isinstance(obj, ResumableLoader) and isinstance(saved_state, dict) and new_data is None:
            old_bs = saved_state.get("batch_size")
            if old_bs != obj.batch_size:
                changes[f"{n}.batch_size"] = [old_bs, obj.batch_size]
    if new_data is not None:
        changes["data_added"] = new_data.model_dump(mode="json")
    return changes


def hparams_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for every hyperparameter that differs."""
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
