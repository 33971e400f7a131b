"""Capture and restore of training state: models, optimizers, schedulers, grad scalers, RNG, Stateful objects
and plain values.

``capture`` turns the user's ``{"model": model, "optimizer": opt, ...}`` into :class:`Captured` components
(typed JSON + tensors); ``restore`` loads tensors and JSON back into the user's live objects. Nothing here knows
about storage.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ckptkit.adapter import find_adapter, get_adapter
from ckptkit.errors import StateMismatchError, UnsupportedStateError
from ckptkit.format import decode, encode
from ckptkit.schema import NAME_RE, ComponentKind

log = logging.getLogger("ckptkit")

RNG = "rng"
"""Name of the component that holds process RNG state (python, numpy, torch CPU, every CUDA device)."""


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: the protocol torch's own checkpointing uses."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass
class Captured:
    """One component, split into JSON and tensors, ready for the format layer."""

    name: str
    kind: ComponentKind
    type: str
    json: Any
    tensors: dict[str, torch.Tensor]
    classes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    adapter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def kind_of(obj: object) -> ComponentKind:
    """Which kind of component ``obj`` is saved as."""
    if isinstance(obj, torch.nn.Module):
        return "model"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "scheduler"
    if isinstance(obj, torch.amp.GradScaler):
        return "grad_scaler"
    if isinstance(obj, Stateful):
        return "stateful"
    return "value"


def check_targets(state: Mapping[str, object]) -> None:
    """Validate the user's component mapping when a manager or call is set up, not deep inside a save."""
    import re

    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of name -> object, e.g. {{'model': model}}; got {type(state)}")
    for name in state:
        if not isinstance(name, str) or not re.match(NAME_RE, name):
            raise ValueError(f"invalid component name {name!r}: use letters, digits, '.', '_' or '-'")
        if name == RNG:
            raise ValueError(f"component name {RNG!r} is reserved for process RNG state (captured automatically)")


# --- parameter naming (optimizer state is keyed by parameter name, not position) -------------------------------


def param_names(state: Mapping[str, object]) -> dict[int, str]:
    """id(parameter) -> name over every model in ``state``; names are prefixed by the component name when
    there is more than one model."""
    models = [(n, m) for n, m in state.items() if isinstance(m, torch.nn.Module)]
    out: dict[int, str] = {}
    for comp, model in models:
        prefix = f"{comp}." if len(models) > 1 else ""
        for pname, p in model.named_parameters():
            out.setdefault(id(p), prefix + pname)
    return out


def _group_names(opt: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    return [
        [names.get(id(p), f"param_groups[{g}][{i}]") for i, p in enumerate(group["params"])]
        for g, group in enumerate(opt.param_groups)
    ]


# --- capture -------------------------------------------------------------------------------------------------


def capture(state: Mapping[str, object], rng: bool = True) -> list[Captured]:
    """Snapshot every component of ``state`` (and process RNG when ``rng``) as :class:`Captured`.

    Tensors are referenced, not copied: the caller must serialise them before training mutates them.
    """
    check_targets(state)
    names = param_names(state)
    out = [_capture_one(n, obj, names) for n, obj in state.items()]
    if rng:
        out.append(_capture_rng())
    return out


def _capture_one(name: str, obj: object, names: dict[int, str]) -> Captured:
    kind = kind_of(obj)
    if kind == "model":
        assert isinstance(obj, torch.nn.Module)
        return _capture_model(name, obj)
    if kind == "optimizer":
        assert isinstance(obj, torch.optim.Optimizer)
        return _capture_optimizer(name, obj, names)
    if kind == "value":
        enc = encode(obj, name)
        return Captured(name, kind, _qualname(obj), enc.json, enc.tensors, {k: "state" for k in enc.tensors})
    assert isinstance(obj, Stateful)
    enc = encode(obj.state_dict(), name)
    return Captured(name, kind, _qualname(obj), enc.json, enc.tensors, {k: "state" for k in enc.tensors})


def _capture_model(name: str, model: torch.nn.Module) -> Captured:
    adapter = find_adapter(model)
    tensors, meta = adapter.capture(model)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UnsupportedStateError(f"{name}.{key}", _qualname(t), "a model state dict holds tensors only")
        if t.numel() > 0:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     t.stride(), t.dtype)  # fmt: skip
            if ident in seen:  # tied weights: store once, restore still tied
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        unique[key] = t
    classes = {k: ("trainable" if k in trainable else "frozen" if k in params else "buffer") for k in unique}
    return Captured(name, "model", _qualname(model), None, unique, classes, aliases, adapter.name, meta)


def _capture_optimizer(name: str, opt: torch.optim.Optimizer, names: dict[int, str]) -> Captured:
    sd = opt.state_dict()
    groups = _group_names(opt, names)
    flat = [n for g in groups for n in g]
    if len(set(flat)) != len(flat):
        dup = sorted({n for n in flat if flat.count(n) > 1})
        raise UnsupportedStateError(f"{name}.param_groups", "duplicate parameters", f"{dup} appear twice")
    by_index = dict(enumerate(flat))
    state = {by_index[int(i)]: s for i, s in sd["state"].items()}
    saved_groups = []
    for g, group in zip(groups, sd["param_groups"], strict=True):
        saved_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": g})
    enc = encode({"state": state, "param_groups": saved_groups}, name)
    return Captured(name, "optimizer", _qualname(opt), enc.json, enc.tensors, {k: "state" for k in enc.tensors})


def determinism_flags() -> dict[str, Any]:
    """The process's determinism settings (recorded with the RNG state; checked by the fidelity report)."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cuda": bool(torch.cuda.is_available() and torch.cuda.is_initialized()),  # type: ignore[no-untyped-call]
    }


def _capture_rng() -> Captured:
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        rng["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    enc = encode(rng, RNG)
    meta = determinism_flags()
    return Captured(RNG, "rng", "process", enc.json, enc.tensors, {k: "state" for k in enc.tensors}, meta=meta)


# --- restore -------------------------------------------------------------------------------------------------


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
    groups = _group_names(opt, names)
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
