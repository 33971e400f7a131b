"""Continue planning: what a ``continue_from`` changes (the LR schedule by policy, optimizer hyperparameters, batch
size, hyperparameters, data) and the record of each change for the lineage edge.

Schedule policies, for any torch LR scheduler and for ckptkit's :class:`~ckptkit.training.PlannedLR`:

- ``keep``: the scheduler is restored as saved, counters included. A checkpoint with no scheduler state (bare
  files, imports) instead moves the freshly built scheduler to the checkpoint's position, in optimizer steps or
  epochs, so its LR equals that of a scheduler that stepped the whole way.
- ``restart``: the caller's freshly built scheduler, and the optimizer hyperparameters it was built with, are kept;
  only the optimizer's state tensors (moments, momentum) come from the checkpoint. A ``PlannedLR`` given
  ``total_steps`` instead appends a fresh warmup and decay to its saved plan.
- ``extend``: restored, then stretched to ``total_steps`` with no jump in the LR (``PlannedLR``,
  ``CosineAnnealingLR`` and the others :func:`~ckptkit.state.schedulers.extend_total` knows the total of).
- ``constant``: restored (or moved to the position), then the LR in effect (or ``lr``) is held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from ckptkit.errors import ArgumentTypeError, InvalidArgumentError
from ckptkit.schema import DataSegment, Manifest
from ckptkit.state import kind_of
from ckptkit.state.schedulers import advance_scheduler, extend_total, hold_lr
from ckptkit.training.loader import ResumableLoader
from ckptkit.training.schedule import PlannedLR

__all__ = ["ContinuePlan", "Position", "SchedulePolicy", "apply_changes", "check_continue", "hparams_diff",
           "keep_hyperparameters", "user_changes"]  # fmt: skip

SchedulePolicy = Literal["keep", "restart", "extend", "constant"]
Position = Literal["step", "epoch"]


@dataclass
class ContinuePlan:
    """A continue's schedule decisions, checked before anything is restored."""

    schedule: SchedulePolicy
    total_steps: int | None
    position: Position
    schedulers: dict[str, Any]  # every scheduler component
    replan: dict[str, PlannedLR]  # PlannedLR components that re-plan themselves to total_steps

    def check_against(self, saved: Manifest) -> None:
        """Refuse a new total that does not lie ahead of a restored scheduler's saved position."""
        if self.total_steps is None:
            return
        for n in self.schedulers:
            c = saved.components.get(n)
            at = c.state.get("last_epoch") if c is not None and isinstance(c.state, dict) else None
            if isinstance(at, int) and not isinstance(at, bool) and self.total_steps <= at and not self.fresh(n, saved):
                raise InvalidArgumentError(
                    f"continue_from(total_steps={self.total_steps}): scheduler {n!r} of checkpoint {saved.name!r} "
                    f"is at step {at}; give a total after the current step {at}"
                )

    def fresh(self, name: str, saved: Manifest) -> bool:
        """Whether scheduler ``name`` is left as the caller built it (not restored from ``saved``)."""
        return name not in saved.components or (self.schedule == "restart" and name not in self.replan)


def check_continue(
    state: Mapping[str, object],
    schedule: SchedulePolicy | None,
    total_steps: int | None,
    warmup_steps: int,
    lr: float | None,
    new_data: DataSegment | None,
    position: Position,
) -> ContinuePlan:
    """Validate a continue's options before anything is restored."""
    policy: SchedulePolicy = "keep" if schedule is None else schedule
    if policy not in get_args(SchedulePolicy):
        raise InvalidArgumentError(f"continue_from(schedule={schedule!r}): use one of {list(get_args(SchedulePolicy))}")
    if position not in get_args(Position):
        raise InvalidArgumentError(f"continue_from(position={position!r}): count the checkpoint's position in "
                                   "'step' (optimizer steps: a scheduler stepped every batch) or 'epoch'")  # fmt: skip
    if new_data is not None and not isinstance(new_data, DataSegment):
        raise ArgumentTypeError(f"new_data must be a ckptkit.schema.DataSegment, got {type(new_data).__name__}")
    schedulers = {n: o for n, o in state.items() if kind_of(o) == "scheduler"}
    if policy != "keep" and not schedulers:
        raise InvalidArgumentError(f"continue_from(schedule={policy!r}) applies to an LR scheduler, and the managed "
                                   "state has none: add it to the state, or leave schedule out")  # fmt: skip
    if policy == "keep" and total_steps is not None:
        raise InvalidArgumentError("continue_from(total_steps=...) goes with a schedule policy: schedule='extend' "
                                   "(same shape, longer), 'restart' or 'constant' (PlannedLR)")  # fmt: skip
    replan = {n: o for n, o in schedulers.items() if isinstance(o, PlannedLR)} if total_steps is not None else {}
    others = [n for n in schedulers if n not in replan]
    if total_steps is not None and policy in ("restart", "constant") and others:
        raise InvalidArgumentError(
            f"continue_from(schedule={policy!r}, total_steps=...): the scheduler(s) {others} are not "
            "ckptkit.training.PlannedLR, which re-plans itself to a total; under 'restart' a torch scheduler keeps the "
            "plan you built it with (build it for the new total), under 'constant' it holds the LR: leave "
            "total_steps out"
        )
    if policy == "extend":
        if total_steps is None:
            raise InvalidArgumentError("continue_from(schedule='extend') needs total_steps= (the new end, in the "
                                       "scheduler's steps)")  # fmt: skip
        for n in others:
            extend_total(schedulers[n], total_steps, check_only=True)
    if warmup_steps and not (policy == "restart" and replan):
        raise InvalidArgumentError("continue_from(warmup_steps=...) applies to schedule='restart' of a PlannedLR; "
                                   "a torch scheduler's warmup is the one you built it with")  # fmt: skip
    if lr is not None and others and policy in ("keep", "extend", "restart"):
        raise InvalidArgumentError(
            f"continue_from(lr=...) with schedule={policy!r}: the torch scheduler(s) {others} compute the LR from "
            "their plan, so a new LR would not last; hold it with schedule='constant', lr=..., or build a scheduler "
            "for the new LR and continue with schedule='restart'"
        )
    return ContinuePlan(policy, total_steps, position, schedulers, replan)


def keep_hyperparameters(state: Mapping[str, object]) -> list[tuple[torch.optim.Optimizer, list[dict[str, Any]]]]:
    """The optimizers' param-group hyperparameters as the caller built them, to put back after a restore
    (``restart``: only the optimizer's state tensors come from the checkpoint)."""
    out = []
    for o in state.values():
        if isinstance(o, torch.optim.Optimizer):
            out.append((o, [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]))
    return out


def apply_changes(
    state: Mapping[str, object],
    m: Manifest,
    plan: ContinuePlan,
    *,
    built: list[tuple[torch.optim.Optimizer, list[dict[str, Any]]]],
    warmup_steps: int,
    lr: float | None,
    optimizer_hparams: Mapping[str, Any] | None,
    new_data: DataSegment | None,
) -> dict[str, Any]:
    """Apply a continue's changes to the restored live objects; return what changed, ``[before, after]``.
    ``built`` is :func:`keep_hyperparameters` taken before the restore."""
    changes: dict[str, Any] = {}
    if plan.schedule != "keep":
        changes["schedule"] = plan.schedule
    opts = [o for o in state.values() if isinstance(o, torch.optim.Optimizer)]
    direct_lr = lr is not None and not plan.replan and plan.schedule != "constant"
    updates = {**(optimizer_hparams or {}), **({"lr": lr} if direct_lr else {})}
    for key, value in updates.items():
        for opt in opts:
            before = [g.get(key) for g in opt.param_groups]
            for g in opt.param_groups:
                g[key] = value
            changes[f"optimizer.{key}"] = [before[0] if len(set(map(repr, before))) == 1 else before, value]
    at = m.progress.global_step if plan.position == "step" else m.progress.epoch
    for n, sched in plan.schedulers.items():
        if plan.fresh(n, m) and plan.schedule == "restart":
            changes[n] = {"restart": "the scheduler as built for this run, from its first step"}
            continue
        if n not in m.components:  # no scheduler state in the checkpoint: move the fresh one to its position
            if not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):  # its LR is the saved one
                _as_built(sched.optimizer, built)  # from the LR it was built with, not the saved (already moved) one
            issues = advance_scheduler(sched, at)
            changes[n] = {"moved_to": {plan.position: at}, **({"issues": issues} if issues else {})}
        if n in plan.replan and plan.total_steps is not None:
            policy = "extend" if plan.schedule == "keep" else plan.schedule
            changes.update(plan.replan[n].replan(policy, plan.total_steps, warmup_steps=warmup_steps, lr=lr))
        elif plan.schedule == "extend" and plan.total_steps is not None:
            changes[f"{n}.total_steps"] = extend_total(sched, plan.total_steps)["total_steps"]
        elif plan.schedule == "constant":
            before = [float(g["lr"]) for g in sched.optimizer.param_groups]
            if lr is not None:
                for g in sched.optimizer.param_groups:
                    g["lr"] = lr
            hold_lr(sched)
            changes[f"{n}.lr"] = [before, [float(g["lr"]) for g in sched.optimizer.param_groups]]
    for n, obj in state.items():
        saved_state = m.components[n].state if n in m.components else None
        if isinstance(obj, ResumableLoader) and isinstance(saved_state, dict) and new_data is None:
            old_bs = saved_state.get("batch_size")
            if old_bs != obj.batch_size:
                changes[f"{n}.batch_size"] = [old_bs, obj.batch_size]
    if new_data is not None:
        changes["data_added"] = new_data.model_dump(mode="json")
    return changes


def _as_built(opt: torch.optim.Optimizer, built: list[tuple[torch.optim.Optimizer, list[dict[str, Any]]]]) -> None:
    """Put back the LR (and initial LR) ``opt``'s groups had as built, before the restore."""
    for o, groups in built:
        if o is opt:
            for g, hp in zip(opt.param_groups, groups, strict=True):
                g.update({k: hp[k] for k in ("lr", "initial_lr") if k in hp})


def user_changes(
    computed: dict[str, Any], given: Mapping[str, Any] | None, state: Mapping[str, object]
) -> dict[str, Any]:
    """The edge's changes: what ckptkit applied plus the caller's free-form ``changes``, whose keys may not be ones
    ckptkit records itself (``schedule``, ``data_added``, ``hparams``, ``optimizer.*``, ``<component>...``). Call
    it with ``computed={}`` to check ``given`` before anything is restored."""
    if given is None:
        return computed
    if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
        raise ArgumentTypeError(f"continue_from(changes=...) must be a mapping with string keys, got {given!r:.80}")
    own = {"schedule", "data_added", "hparams", "optimizer", *state}
    clash = sorted(k for k in given if k in computed or k.split(".")[0] in own)
    if clash:
        raise InvalidArgumentError(f"continue_from(changes=...): {clash} name changes ckptkit records itself; use "
                                   "other keys (e.g. 'note', 'reason')")  # fmt: skip
    return {**computed, **given}


def hparams_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for every hyperparameter that differs."""
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
