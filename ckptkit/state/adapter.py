"""The model-adapter protocol and its registry.

An adapter knows one model family (HF transformers, timm, detection, fusion, plain ``nn.Module``) and nothing
of storage. Adapters live in the ``ckptkit.adapters`` package and are imported lazily by name, so importing
ckptkit never imports a framework.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import torch
from pydantic import JsonValue

from ckptkit.errors import AdapterError, InvalidArgumentError, MissingDependencyError

__all__ = ["ModelAdapter", "find_adapter", "get_adapter", "register_adapter", "registered"]


@runtime_checkable
class ModelAdapter(Protocol):
    """Captures a model's tensors (and what is needed to rebuild it) and restores them into a model."""

    name: str

    def can_handle(self, model: torch.nn.Module) -> bool:
        """Whether this adapter understands ``model``."""
        ...

    def capture(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
        """The model's state dict and JSON metadata (config, class, labels) to record in the manifest."""
        ...

    def restore(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (already checked against the model's keys and shapes) into ``model``."""
        ...

    def heads(self, model: torch.nn.Module) -> list[str]:
        """Module paths of the task heads (what a transfer to a new task re-initialises)."""
        ...

    def export(self, tensors: dict[str, torch.Tensor], meta: dict[str, JsonValue], dest: str) -> list[str]:
        """Write the model in its framework's own format into the folder ``dest``; return the files written."""
        ...


# name -> "module:attribute"; checked in order, the first whose can_handle() accepts the model wins.
# Framework adapters register before the plain fallback.
_REGISTRY: dict[str, str] = {
    "hf": "ckptkit.adapters.hf:HFAdapter",
    "timm": "ckptkit.adapters.timm:TimmAdapter",
    "torchvision-detection": "ckptkit.adapters.detection:TorchvisionDetectionAdapter",
    "fusion": "ckptkit.adapters.fusion:FusionAdapter",
    "plain": "ckptkit.adapters.plain:PlainModuleAdapter",
}
_FALLBACK = "plain"


def register_adapter(name: str, target: str) -> None:
    """Register an adapter class by import path (``"package.module:Class"``), ahead of the fallback."""
    if ":" not in target:
        raise InvalidArgumentError(f"adapter target must look like 'package.module:Class', got {target!r}")
    fallback = _REGISTRY.pop(_FALLBACK)
    _REGISTRY[name] = target
    _REGISTRY[_FALLBACK] = fallback


def get_adapter(name: str) -> ModelAdapter:
    """The adapter registered as ``name``."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise AdapterError(f"no adapter named {name!r}; registered: {', '.join(_REGISTRY)}; register yours with "
                           "ckptkit.state.register_adapter(name, 'package.module:Class')") from None
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise MissingDependencyError(f"adapter {name!r} needs a package that is not installed: {err}") from err
    adapter = cls()
    if not isinstance(adapter, ModelAdapter):
        raise AdapterError(f"{target} does not implement the ModelAdapter protocol (can_handle, capture, restore, "
                           "heads, export)")
    return adapter


def registered() -> list[str]:
    """Names of the registered adapters, in the order they are tried."""
    return list(_REGISTRY)


def find_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The first registered adapter that can handle ``model`` (the plain one handles any ``nn.Module``)."""
    for name in _REGISTRY:
        try:
            adapter = get_adapter(name)
        except MissingDependencyError:
            continue  # its framework is not installed, so the model cannot be one of its kind
        if adapter.can_handle(model):
            return adapter
    raise AdapterError(
        f"no adapter handles {type(model).__qualname__}; registered adapters: {', '.join(_REGISTRY)}"
    )
