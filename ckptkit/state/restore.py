"""Restore of training state into the user's live objects: models (through their adapter), optimizers by
parameter name, Stateful objects and process RNG. Nothing here knows about storage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptkit.errors import StateMismatchError
from ckptkit.format import decode
from ckptkit.schema import ComponentKind
from ckptkit.state.adapter import find_adapter, get_adapter
from ckptkit.state.capture import RNG, Stateful, group_names

__all__ = ["LoadReport", "Saved", "restore_model", "restore_optimizer", "restore_rng", "restore_stateful"]


@dataclass
class LoadReport:
    """How a component's saved tensors matched the live object (what a non-strict restore returns)."""

    component: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"{self.loaded} loaded"]
        if self.missing:
            parts.append(f"missing in checkpoint: {_few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (not in the model): {_few(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} saved {s} vs model {m}" for k, (s, m) in list(self.mismatched.items())[:5]]
            parts.append(f"shape mismatch: {', '.join(shown)}" + (" ..." if len(self.mismatched) > 5 else ""))
        return "; ".join(parts)


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


@dataclass
class Saved:
    """A component as read back from a checkpoint: its kind, JSON, tensors and metadata."""

    kind: ComponentKind
    json: Any
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    adapter: str | None
    meta: dict[str, Any]


def restore_model(name: str, model: torch.nn.Module, saved: Saved, strict: bool) -> LoadReport:
    """Load saved tensors into ``model``; on mismatch raise (strict) or load what fits and report."""
    adapter = get_adapter(saved.adapter) if saved.adapter else find_adapter(model)
    live, _ = adapter.capture(model)
    tensors = dict(saved.tensors)
    for alias, target in saved.aliases.items():
        tensors[alias] = tensors[target]
    report = LoadReport(name)
    report.missing = [k for k in live if k not in tensors]
    report.unexpected = [k for k in tensors if k not in live]
    fits: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if k not in live:
            continue
        if tuple(t.shape) != tuple(live[k].shape):
            report.mismatched[k] = (list(t.shape), list(live[k].shape))
        else:
            fits[k] = t
    if strict and not report.ok:
        raise StateMismatchError(name, report)
    adapter.restore(model, fits)
    report.loaded = len(fits)
    return report


def restore_optimizer(
    name: str, opt: torch.optim.Optimizer, saved: Saved, names: dict[int, str], strict: bool
) -> LoadReport:
    """Load optimizer state by parameter name into ``opt``, whatever the order of its parameters."""
    data = decode(saved.json, saved.tensors, name)
    groups = group_names(opt, names)
    saved_groups = data["param_groups"]
    report = LoadReport(name)
    live = {n for g in groups for n in g}
    stored = {n for g in saved_groups for n in g["params"]}
    report.missing = sorted(live - stored)
    report.unexpected = sorted(stored - live)
    if len(saved_groups) != len(groups):
        report.mismatched["param_groups"] = ([len(saved_groups)], [len(groups)])
    if strict and not report.ok:
        raise StateMismatchError(
            name, report, "build the optimizer over the same parameters as the saved run, or pass strict=False"
        )
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    new_groups = []
    for g, live_names in enumerate(groups):
        hparams = {k: v for k, v in saved_groups[g].items() if k != "params"} if g < len(saved_groups) else {}
        current = {k: v for k, v in opt.param_groups[g].items() if k != "params"}
        new_groups.append({**current, **hparams, "params": [index[n] for n in live_names]})
    new_state = {index[n]: s for n, s in data["state"].items() if n in index}
    opt.load_state_dict({"state": new_state, "param_groups": new_groups})
    report.loaded = len(new_state)
    return report


def restore_stateful(name: str, obj: Stateful, saved: Saved) -> None:
    """Hand the decoded state to ``obj.load_state_dict``."""
    obj.load_state_dict(decode(saved.json, saved.tensors, name))


def restore_rng(saved: Saved) -> list[str]:
    """Restore process RNG; return what could not be restored (e.g. a CUDA device count that differs)."""
    data = decode(saved.json, saved.tensors, RNG)
    random.setstate(data["python"])
    np.random.set_state(data["numpy"])
    torch.set_rng_state(data["torch"])
    problems: list[str] = []
    cuda = data.get("cuda", [])
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, s in enumerate(cuda[:have]):
        torch.cuda.set_rng_state(s, i)
    if cuda and len(cuda) != have:
        problems.append(f"checkpoint has RNG state of {len(cuda)} CUDA device(s), this process sees {have}")
    elif not cuda and have and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        problems.append("checkpoint holds no CUDA RNG state (saved before CUDA was used); CUDA streams not resumed")
    return problems
