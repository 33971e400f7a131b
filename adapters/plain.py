"""The fallback adapter: any ``torch.nn.Module``, through its state dict."""

from __future__ import annotations

import os

import torch
from pydantic import JsonValue
from safetensors.torch import save_file

__all__ = ["PlainModuleAdapter"]


class PlainModuleAdapter:
    """Any ``nn.Module``: captures ``state_dict()`` and records the model's class."""

    name = "plain"

    def can_handle(self, model: torch.nn.Module) -> bool:
        return isinstance(model, torch.nn.Module)

    def capture(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
        cls = type(model)
        return dict(model.state_dict()), {"class": f"{cls.__module__}.{cls.__qualname__}"}

    def restore(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors, strict=False)

    def heads(self, model: torch.nn.Module) -> list[str]:
        return []  # a plain module has no declared task head

    def export(self, tensors: dict[str, torch.Tensor], meta: dict[str, JsonValue], dest: str) -> list[str]:
        os.makedirs(dest, exist_ok=True)
        path = os.path.join(dest, "model.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return [path]
