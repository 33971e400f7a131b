"""Policies for any ``torch.optim.lr_scheduler`` scheduler: move a fresh one to a position, hold its LR, extend it.

- :func:`advance_scheduler` moves a freshly built scheduler to where a checkpoint that holds no scheduler state
  stopped (bare weights + optimizer files, imports): afterwards its LRs and state are those of a scheduler that
  stepped the whole way (the ``keep`` policy for such checkpoints).
- :func:`hold_lr` makes any scheduler keep counting but never change the LR again (the ``constant`` policy); the
  hold is saved with the scheduler's state and comes back on restore.
- :func:`extend_total` stretches a scheduler whose total is known (``CosineAnnealingLR``, ``LinearLR``,
  ``PolynomialLR``) to a new total, continuing from the current LR with no jump (the ``extend`` policy).

``restart`` needs nothing here: build the scheduler afresh. ``ckptkit.training.PlannedLR`` re-plans itself.

Example:
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    >>> advance_scheduler(sched, 25)
    []
    >>> sched.last_epoch, sched.get_last_lr()
    (25, [0.025])
    >>> hold_lr(sched)
    >>> for _ in range(10):
    ...     sched.step()
    >>> sched.last_epoch, opt.param_groups[0]["lr"]
    (35, 0.025)
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    SequentialLR,
)

from ckptkit.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["HELD_LR_KEY", "advance_scheduler", "extend_total", "hold_lr", "is_held"]

HELD_LR_KEY = "ckptkit_held_lr"
"""The key a held scheduler's ``state_dict()`` adds (``True``); a restore holds the live scheduler again."""

_EXTENDABLE: tuple[type[LRScheduler], ...] = (CosineAnnealingLR, LinearLR, PolynomialLR)
# torch's warning for a scheduler stepped before its optimizer: advancing steps the scheduler alone on purpose.
_BEFORE_OPTIMIZER = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def _check_scheduler(scheduler: object, func: str) -> LRScheduler:
    if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise ArgumentTypeError(f"{func}: scheduler must be a torch.optim.lr_scheduler scheduler (LRScheduler or "
                                f"ReduceLROnPlateau), got {type(scheduler).__module__}.{type(scheduler).__qualname__}; "
                                "pass the scheduler object itself, not its state_dict()")  # fmt: skip
    return scheduler


def _count(value: object, what: str, func: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise InvalidArgumentError(f"{func}: {what} must be a non-negative int, got {value!r} "
                                   f"({type(value).__name__})")  # fmt: skip
    return int(value)


def _name(obj: object) -> str:
    return _base(type(obj)).__name__


def _children(scheduler: object) -> list[Any]:
    inner = getattr(scheduler, "_schedulers", None)
    return list(inner) if isinstance(inner, (list, tuple)) else []


def _group_lrs(optimizer: torch.optim.Optimizer) -> list[Any]:
    return [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups]


# --- advance ---------------------------------------------------------------------------------------------------


def advance_scheduler(scheduler: object, steps: int) -> list[str]:
    """Move a freshly built ``scheduler`` forward as if ``scheduler.step()`` had been called ``steps`` times (each
    after an ``optimizer.step()``): its optimizer's param-group LRs and its state (``last_epoch``, ``_last_lr``, the
    inner schedulers of ``SequentialLR`` / ``ChainedScheduler``) become those of a scheduler that stepped the whole
    way, and stepping on gives the same LRs.

    ``steps`` counts ``scheduler.step()`` calls: optimizer steps for a scheduler stepped every batch, epochs for one
    stepped every epoch. Only what the scheduler itself sets in the param groups changes (``lr``; ``momentum`` /
    ``betas`` for ``OneCycleLR`` and ``CyclicLR``); optimizer state (``exp_avg``, ...) is not touched. The
    scheduler is stepped ``steps`` times in a loop (about 1 s per 100 000 steps of ``LambdaLR``).

    ``ReduceLROnPlateau`` reduces its LR on metric values that the checkpoint does not hold: its ``last_epoch``
    is set to ``steps`` and its LR kept, and the returned issues say so.

    Args:
        scheduler: a torch LR scheduler built afresh (``last_epoch=-1``) on the restored optimizer.
        steps: the position to move to, in ``scheduler.step()`` calls.

    Returns:
        Human-readable issues: where the position reached is not exact (empty when it is).

    Raises:
        ArgumentTypeError: ``scheduler`` is not a torch LR scheduler.
        InvalidArgumentError: ``steps`` is not a non-negative int; the scheduler (or an inner one) has stepped
            already; a ``OneCycleLR`` would pass its ``total_steps``. The scheduler is then left as it was.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        >>> advance_scheduler(sched, 4)
        []
        >>> sched.last_epoch, opt.param_groups[0]["lr"]
        (4, 0.5)
    """
    scheduler = _check_scheduler(scheduler, "advance_scheduler")
    steps = _count(steps, "steps", "advance_scheduler")
    stepped = _stepped(scheduler, "scheduler")
    if stepped:
        raise InvalidArgumentError(
            f"advance_scheduler: the scheduler must be freshly built, but {stepped}: build the "
            f"{_name(scheduler)} again on the restored optimizer (last_epoch=-1, the default) and advance that"
        )
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.last_epoch = steps
        if not steps:
            return []
        return [f"ReduceLROnPlateau: set to position {steps} (last_epoch={steps}) with the learning rate kept at "
                f"{_group_lrs(scheduler.optimizer)}: its reductions depend on the metric values passed to "
                "step(metric), which the checkpoint does not hold, so reductions the saved run made are not replayed "
                "(and best / num_bad_epochs start afresh); set the optimizer's lr to the run's last value if you "
                "know it"]  # fmt: skip
    _check_one_cycle(scheduler, steps, "scheduler")
    snapshot = _snapshot(scheduler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_BEFORE_OPTIMIZER, category=UserWarning)
            for _ in range(steps):
                scheduler.step()
    except BaseException:
        _roll_back(scheduler, snapshot)
        raise
    return []


def _stepped(scheduler: object, where: str) -> str | None:
    """Where ``scheduler`` (or an inner scheduler) has stepped since it was built, or None."""
    last = getattr(scheduler, "last_epoch", None)
    if isinstance(last, int) and last > 0:
        return f"{where} ({_name(scheduler)}) is at last_epoch={last}"
    for i, inner in enumerate(_children(scheduler)):
        found = _stepped(inner, f"{where}._schedulers[{i}]")
        if found:
            return found
    return None


def _check_one_cycle(scheduler: object, position: int, where: str) -> None:
    """Refuse a position that would step a ``OneCycleLR`` (``scheduler`` or an inner one) past its total."""
    if isinstance(scheduler, OneCycleLR) and position > scheduler.total_steps:
        raise InvalidArgumentError(
            f"advance_scheduler: {where} is a OneCycleLR of total_steps={scheduler.total_steps}, and position "
            f"{position} lies beyond it (OneCycleLR cannot step past its total): advance to at most "
            f"{scheduler.total_steps}, or build it with total_steps (or epochs x steps_per_epoch) covering the run"
        )
    inner = _children(scheduler)
    if isinstance(scheduler, SequentialLR):
        milestones = [int(m) for m in scheduler._milestones]
        for i, child in enumerate(inner):
            start = milestones[i - 1] if i > 0 else 0
            end = milestones[i] - 1 if i < len(milestones) else position
            if position >= start:
                _check_one_cycle(child, min(position, end) - start, f"{where}._schedulers[{i}]")
    elif isinstance(scheduler, ChainedScheduler):
        for i, child in enumerate(inner):
            _check_one_cycle(child, position, f"{where}._schedulers[{i}]")


def _copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_copy(x) for x in v) if isinstance(v, list) else tuple(_copy(x) for x in v)
    return v


def _snapshot(scheduler: LRScheduler) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    groups = [{k: _copy(v) for k, v in g.items() if k != "params"} for g in scheduler.optimizer.param_groups]
    return groups, _copy(scheduler.state_dict())


def _roll_back(scheduler: LRScheduler, snapshot: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    groups, state = snapshot
    for group, saved in zip(scheduler.optimizer.param_groups, groups, strict=True):
        for k in [k for k in group if k != "params" and k not in saved]:
            del group[k]
        for k, v in saved.items():
            cur = group.get(k)
            if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor) and cur.shape == v.shape:
                cur.copy_(v)  # an LR tensor stays the same object (compiled / capturable optimizers hold it)
            else:
                group[k] = v
    scheduler.load_state_dict(state)


# --- hold (the 'constant' policy) -------------------------------------------------------------------------------


class _HeldLR(LRScheduler):
    """Mixin of the held classes: ``step`` counts but leaves the LRs; the state carries :data:`HELD_LR_KEY`."""

    _ckptkit_base: type[LRScheduler]

    def step(self, *args: Any, **kwargs: Any) -> None:
        at = 1 if isinstance(self, ReduceLROnPlateau) else 0  # step(metrics, epoch=None) / step(epoch=None)
        epoch = args[at] if len(args) > at else kwargs.get("epoch")
        self.last_epoch = int(epoch) if epoch is not None else self.last_epoch + 1
        if "_step_count" in self.__dict__:
            self._step_count += 1
        self._last_lr = _group_lrs(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[HELD_LR_KEY] = True
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state.pop(HELD_LR_KEY, None)
        super().load_state_dict(state)

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickled as a held <base class>: held classes are made at run time
        return _rebuild_held, (self._ckptkit_base,), self.__dict__


_HELD_CLASSES: dict[type[LRScheduler], type[LRScheduler]] = {}


def _base(cls: type) -> type:
    return cast("type", getattr(cls, "_ckptkit_base", cls))


def _held_class(cls: type[LRScheduler]) -> type[LRScheduler]:
    if issubclass(cls, _HeldLR):
        return cls
    held = _HELD_CLASSES.get(cls)
    if held is None:
        # The held class keeps the module of its base, so that a held torch scheduler is still torch's own to the
        # checks that compare saved state with live state (ckptkit.state.restore.prepare_stateful).
        doc = f"A {cls.__qualname__} held by ckptkit.state.hold_lr: step() counts but keeps the LRs."
        made = type(f"Held{cls.__name__}", (_HeldLR, cls), {
            "__module__": cls.__module__, "__qualname__": f"Held{cls.__qualname__}", "_ckptkit_base": cls,
            "__doc__": doc})  # fmt: skip
        held = _HELD_CLASSES.setdefault(cls, made)
    return held


def _rebuild_held(base: type[LRScheduler]) -> LRScheduler:
    held = _held_class(base)
    return held.__new__(held)


def hold_lr(scheduler: object) -> None:
    """Hold the LR of any torch scheduler (the ``constant`` policy): from now on ``scheduler.step()`` (and
    ``step(metric)`` of ``ReduceLROnPlateau``) counts (``last_epoch += 1``, ``get_last_lr()`` the current LRs) but
    never changes the optimizer's LRs; the inner schedulers of ``SequentialLR`` / ``ChainedScheduler`` are not
    stepped. (A ``ChainedScheduler``, which keeps no count of its own, gets a ``last_epoch`` from its inner ones.)

    The scheduler's class becomes a subclass of its own (``HeldStepLR`` for a ``StepLR``; still an instance of
    ``StepLR``) whose ``state_dict()`` adds ``"ckptkit_held_lr": True``: a ckptkit restore of that state into a
    freshly built scheduler of the original class holds it again. Holding a held scheduler changes nothing.

    Raises:
        ArgumentTypeError: ``scheduler`` is not a torch LR scheduler.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        >>> hold_lr(sched)
        >>> sched.step()
        >>> type(sched).__name__, sched.last_epoch, opt.param_groups[0]["lr"], sched.state_dict()["ckptkit_held_lr"]
        ('HeldExponentialLR', 1, 0.1, True)
    """
    scheduler = _check_scheduler(scheduler, "hold_lr")
    if isinstance(scheduler, _HeldLR):
        return
    if not isinstance(getattr(scheduler, "last_epoch", None), int):  # ChainedScheduler counts through its children
        scheduler.last_epoch = max((c.last_epoch for c in _children(scheduler)
                                    if isinstance(getattr(c, "last_epoch", None), int)), default=0)  # fmt: skip
    scheduler.__class__ = _held_class(type(scheduler))


def is_held(scheduler: object) -> bool:
    """Whether :func:`hold_lr` holds ``scheduler``'s LR.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        >>> is_held(sched)
        False
        >>> hold_lr(sched)
        >>> is_held(sched)
        True
    """
    return isinstance(scheduler, _HeldLR)


# --- extend ----------------------------------------------------------------------------------------------------


def extend_total(scheduler: object, total_steps: int, *, check_only: bool = False) -> dict[str, list[Any]]:
    """Stretch a scheduler whose total is known to end at ``total_steps`` (the ``extend`` policy): the LR goes on
    from its current value with no jump and follows the scheduler's own shape to its end value at ``total_steps``.

    - ``CosineAnnealingLR``: ``T_max = total_steps``; the cosine decays from the current LR to ``eta_min``.
    - ``PolynomialLR``: ``total_iters = total_steps``; the LR decays as ``(total_steps - step) ** power`` to 0.
    - ``LinearLR``: ``total_iters = total_steps``, and ``start_factor`` moves so that the line runs from the current
      LR to ``end_factor`` x the base LR at ``total_steps``.

    ``total_steps`` counts ``scheduler.step()`` calls from the start, as ``last_epoch`` does. The LRs follow from the
    schedulers' step-by-step form, ``step()``; the deprecated ``step(epoch)`` is not continued.

    Args:
        scheduler: the torch LR scheduler, restored (or advanced) to its current step.
        total_steps: the new end, in ``scheduler.step()`` calls from the start.
        check_only: check that the scheduler can be extended to ``total_steps`` now, and change nothing.

    Returns:
        What changed (or would change), ``{"total_steps": [old, new]}`` (and ``"start_factor": [old, new]`` for
        ``LinearLR``).

    Raises:
        ArgumentTypeError: ``scheduler`` is not a torch LR scheduler.
        InvalidArgumentError: the scheduler's total is not known (``StepLR``, ``LambdaLR``, ``OneCycleLR``,
            ``SequentialLR``, ...), it is held, or ``total_steps`` is not an int ahead of its current step.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
        >>> advance_scheduler(sched, 50)
        []
        >>> before = opt.param_groups[0]["lr"]
        >>> extend_total(sched, 200)
        {'total_steps': [100, 200]}
        >>> sched.step()
        >>> 0.99 * before < opt.param_groups[0]["lr"] < before
        True
    """
    scheduler = _check_scheduler(scheduler, "extend_total")
    if is_held(scheduler):
        raise InvalidArgumentError(f"extend_total: the {_name(scheduler)} is held at a constant LR (hold_lr): "
                                   "'extend' and 'constant' exclude each other; build the scheduler afresh to "
                                   "extend it")  # fmt: skip
    kind = next((c for c in _EXTENDABLE if isinstance(scheduler, c) and type(scheduler).get_lr is c.get_lr), None)
    if kind is None:
        names = ", ".join(c.__name__ for c in _EXTENDABLE)
        if callable(getattr(scheduler, "replan", None)):  # ckptkit.training.PlannedLR (not imported: a layer above)
            raise InvalidArgumentError(f"extend_total: a {_name(scheduler)} re-plans itself: call its "
                                       f"replan('extend', {total_steps!r}) instead")  # fmt: skip
        raise InvalidArgumentError(
            f"extend_total: 'extend' needs a scheduler whose total is known ({names}), and a "
            f"{_name(scheduler)} is not one: use 'keep' (go on as built), 'restart' (build it afresh) or 'constant' "
            "(hold_lr), or schedule with ckptkit.training.PlannedLR, which re-plans itself"
        )
    total = _count(total_steps, "total_steps", "extend_total")
    step = scheduler.last_epoch
    if total <= step:
        raise InvalidArgumentError(f"extend_total: total_steps={total} is not ahead of the {_name(scheduler)}'s "
                                   f"current step {step}: give a total larger than {step}")  # fmt: skip
    if kind is CosineAnnealingLR:
        cosine = cast("CosineAnnealingLR", scheduler)
        old = cosine.T_max
        if not check_only:
            cosine.T_max = total
        return {"total_steps": [old, total]}
    if kind is PolynomialLR:
        poly = cast("PolynomialLR", scheduler)
        old = poly.total_iters
        if step >= old:
            raise InvalidArgumentError(_ended(poly, step, old))
        if not check_only:
            poly.total_iters = total
        return {"total_steps": [old, total]}
    linear = cast("LinearLR", scheduler)
    start, end, old = linear.start_factor, linear.end_factor, linear.total_iters
    factor = start + (end - start) * min(old, step) / old if old > 0 else end  # the factor in effect now
    if factor <= 0:
        raise InvalidArgumentError(_ended(linear, step, old))
    # The line through (step, factor) and (total, end) meets step 0 at new_start: torch's recursive LinearLR then
    # multiplies the current LR by (total*s' + t*(end-s')) / (total*s' + (t-1)*(end-s')), which telescopes to it.
    new_start = (total * factor - step * end) / (total - step)
    if not check_only:
        linear.start_factor, linear.total_iters = new_start, total
    return {"total_steps": [old, total], "start_factor": [start, new_start]}


def _ended(scheduler: LRScheduler, step: int, total: int) -> str:
    return (f"extend_total: the {_name(scheduler)} ended at step {total} with an LR of 0 (it is at step {step}): "
            "extended, it would stay at 0; use 'restart' (build it afresh) or 'constant' with a new LR instead")
