"""Capture of training state: models, optimizers, schedulers, grad scalers, RNG, Stateful objects and plain
values.

``capture`` turns the user's ``{"model": model, "optimizer": opt, ...}`` into :class:`Captured` components
(typed JSON + tensors); :mod:`ckptkit.state.restore` loads them back. Nothing here knows about storage.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ckptkit.errors import ArgumentTypeError, InvalidArgumentError, OptimizerMappingError, UnsupportedStateError
from ckptkit.format import encode
from ckptkit.hashing import check_name
from ckptkit.schema import ComponentKind
from ckptkit.state.adapter import find_adapter
from ckptkit.state.foreign import is_foreign_scheduler, plain_state

__all__ = [
    "RNG",
    "Captured",
    "Stateful",
    "capture",
    "check_targets",
    "determinism_flags",
    "group_names",
    "is_data_loader",
    "kind_of",
    "model_component",
    "optimizer_component",
    "param_names",
    "positional_name",
    "qualname",
    "state_component",
]

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


def qualname(obj: object) -> str:
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
    if is_foreign_scheduler(obj):  # mmengine's parameter schedulers
        return "scheduler"
    if isinstance(obj, torch.amp.GradScaler):
        return "grad_scaler"
    if isinstance(obj, Stateful):
        return "stateful"
    return "value"


def check_targets(state: Mapping[str, object]) -> None:
    """Validate the user's component mapping when a manager or call is set up, not deep inside a save."""

    if not isinstance(state, Mapping):
        raise ArgumentTypeError(
            f"state must be a mapping of name -> object, e.g. {{'model': model}}; got {type(state).__name__}"
        )
    for name in state:
        check_name(name, "component name")
        if name == RNG:
            raise InvalidArgumentError(f"component name {RNG!r} is reserved for process RNG state (captured "
                                       "automatically): rename that component")


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


def positional_name(group: int, index: int) -> str:
    """The name of a parameter that no model names: its position, ``param_groups[<group>][<index>]``."""
    return f"param_groups[{group}][{index}]"


def group_names(opt: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    return [
        [names.get(id(p), positional_name(g, i)) for i, p in enumerate(group["params"])]
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
        return state_component(name, kind, qualname(obj), obj)
    assert isinstance(obj, Stateful)
    return state_component(name, kind, qualname(obj), plain_state(qualname(obj), obj.state_dict()))


def _capture_model(name: str, model: torch.nn.Module) -> Captured:
    adapter = find_adapter(model)
    tensors, meta = adapter.capture(model)
    return model_component(name, tensors, model, adapter=adapter.name, meta=meta)


def _capture_optimizer(name: str, opt: torch.optim.Optimizer, names: dict[int, str]) -> Captured:
    groups = group_names(opt, names)
    flat = [n for g in groups for n in g]
    if len(set(flat)) != len(flat):
        dup = sorted({n for n in flat if flat.count(n) > 1})
        raise UnsupportedStateError(f"{name}.param_groups", "duplicate parameters", f"{dup} appear twice")
    return optimizer_component(name, opt.state_dict(), groups, qualname(opt))


# --- components from state dicts (what a save and an import of foreign files both build) -----------------------


def model_component(
    name: str,
    tensors: Mapping[str, object],
    model: torch.nn.Module | None = None,
    *,
    adapter: str = "plain",
    meta: Mapping[str, Any] | None = None,
    type_name: str | None = None,
) -> Captured:
    """The component of a model's state dict ``tensors``, by the rules every save uses.

    - Tensors that share storage (tied weights) are stored once; the other names become aliases of the first.
    - With ``model`` (the live model, or a skeleton on the meta device): a name that ``model`` ties to a stored tensor
      (one parameter registered under several names) but ``tensors`` lacks, as ``save_pretrained`` leaves it out,
      becomes an alias of it too.
    - Each stored tensor is classed ``trainable`` / ``frozen`` (a parameter of ``model`` with / without
      ``requires_grad``) or ``buffer``; without ``model``, floating-point tensors count as trainable, others as buffers.

    Args:
        name: the component name.
        tensors: the state dict (``adapter.capture(model)[0]``, or one read from a file).
        model: the model the state dict belongs to, if known (its weights are not read).
        adapter: the registered name of the model adapter that restores and exports it.
        meta: the adapter's metadata.
        type_name: the model class recorded; by default ``model``'s (``torch.nn.Module`` without one).

    Raises:
        UnsupportedStateError: a value of ``tensors`` is not a tensor.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> model_component("model", lin.state_dict(), lin).classes
        {'weight': 'trainable', 'bias': 'trainable'}
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UnsupportedStateError(f"{name}.{key}", qualname(t), "a model state dict holds tensors only")
        if t.numel() > 0:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     t.stride(), t.dtype)  # fmt: skip
            if ident in seen:  # tied weights: store once, restore still tied
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        unique[key] = t
    if model is None:
        classes = {k: ("trainable" if t.is_floating_point() else "buffer") for k, t in unique.items()}
    else:
        named = list(model.named_parameters(remove_duplicate=False))
        tied: dict[int, list[str]] = {}
        for n, p in named:
            tied.setdefault(id(p), []).append(n)
        for group in tied.values():
            present = [n for n in group if n in tensors]
            for n in group:
                if n not in tensors and present:  # the target may itself be stored under another name
                    aliases[n] = aliases.get(present[0], present[0])
        trainable = {n for n, p in named if p.requires_grad}
        params = {n for n, _ in named}
        classes = {k: ("trainable" if k in trainable else "frozen" if k in params else "buffer") for k in unique}
    type_ = type_name or (qualname(model) if model is not None else "torch.nn.Module")
    return Captured(name, "model", type_, None, unique, classes, aliases, adapter, dict(meta or {}))


def optimizer_component(
    name: str, state_dict: Mapping[str, Any], groups: list[list[str]], type_name: str = "torch.optim.Optimizer"
) -> Captured:
    """The component of an optimizer, keyed by parameter name (not position), as every save stores it.

    Args:
        name: the component name.
        state_dict: ``optimizer.state_dict()``: ``state`` keyed by the parameter ids its ``param_groups`` list.
        groups: the name of each parameter, group by group, in the order ``param_groups`` lists them
            (:func:`group_names` for a live optimizer).
        type_name: the optimizer class recorded.

    Raises:
        OptimizerMappingError: ``groups`` does not give each saved parameter exactly one distinct name.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> optimizer_component("optimizer", opt.state_dict(), [["weight", "bias"]]).json["param_groups"][0]["params"]
        ['weight', 'bias']
    """
    saved = state_dict["param_groups"]
    flat = [n for g in groups for n in g]
    sizes, given = [len(g["params"]) for g in saved], [len(g) for g in groups]
    index = {pid: n for g, names in zip(saved, groups, strict=False)
             for pid, n in zip(g["params"], names, strict=False)}  # fmt: skip
    unnamed = [pid for pid in state_dict["state"] if pid not in index]
    if sizes != given or len(set(flat)) != len(flat) or unnamed:
        dup = sorted({n for n in flat if flat.count(n) > 1})
        problem = f"its param_groups hold {sizes} parameters, the names given {given}"
        if dup:
            problem += f", names used twice: {dup[:5]}"
        if unnamed:
            problem += f", state for parameters no group lists: {unnamed[:5]}"
        raise OptimizerMappingError(
            f"cannot key optimizer {name!r} by parameter name: {problem}; give exactly one distinct name per saved "
            "parameter, group by group in param_groups order"
        )
    state = {index[i]: s for i, s in state_dict["state"].items()}
    saved_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
                    for g, names in zip(saved, groups, strict=True)]  # fmt: skip
    return state_component(name, "optimizer", type_name, {"state": state, "param_groups": saved_groups})


def state_component(
    name: str, kind: ComponentKind, type_name: str, state: Any, meta: Mapping[str, Any] | None = None
) -> Captured:
    """The component of a state that is not a model (optimizer, scheduler, grad scaler, RNG, Stateful, value):
    typed JSON plus tensors, every tensor of class ``state``.

    Raises:
        UnsupportedStateError: a value cannot be stored without pickle.

    Example:
        >>> state_component("scheduler", "scheduler", "torch.optim.lr_scheduler.StepLR", {"last_epoch": 3}).json
        {'last_epoch': 3}
    """
    enc = encode(state, name)
    return Captured(name, kind, type_name, enc.json, enc.tensors, {k: "state" for k in enc.tensors},
                    meta=dict(meta or {}))  # fmt: skip


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
    return state_component(RNG, "rng", "process", rng, meta=determinism_flags())


def is_data_loader(obj: object) -> bool:
    """Whether ``obj`` carries data position (ckptkit's loaders, torchdata's StatefulDataLoader, or any object
    with a true ``data_loader`` attribute and ``state_dict``)."""
    if getattr(obj, "data_loader", False) is True:
        return True
    return type(obj).__name__ == "StatefulDataLoader"
