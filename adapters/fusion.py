"""Fusion models: a module whose named sub-models are handled by other adapters (a text branch from HF, an
image branch from timm, a fusion head of its own)."""

from __future__ import annotations

import os

import torch
from pydantic import JsonValue

from ckptkit.errors import MissingDependencyError
from ckptkit.state.adapter import ModelAdapter, get_adapter, registered

__all__ = ["FusionAdapter", "branches"]


def branches(model: torch.nn.Module) -> dict[str, ModelAdapter]:
    """The outermost sub-modules handled by a framework adapter, by module path."""
    frameworks = []
    for name in registered():
        if name in ("plain", "fusion"):
            continue
        try:
            frameworks.append(get_adapter(name))
        except MissingDependencyError:
            continue  # its framework is not installed, so no sub-module can be one of its models
    found: dict[str, ModelAdapter] = {}
    for path, mod in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        adapter = next((a for a in frameworks if a.can_handle(mod)), None)
        if adapter is not None:
            found[path] = adapter
    return found


class FusionAdapter:
    """A model assembled from framework models: records each branch's adapter and metadata."""

    name = "fusion"

    def can_handle(self, model: torch.nn.Module) -> bool:
        return bool(branches(model))

    def capture(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
        meta: dict[str, JsonValue] = {"framework": "fusion", "class": type(model).__qualname__, "branches": {}}
        found = branches(model)
        modules = dict(model.named_modules())
        out: dict[str, JsonValue] = {}
        for prefix, adapter in found.items():
            _, branch_meta = adapter.capture(modules[prefix])
            out[prefix] = {"adapter": adapter.name, "meta": branch_meta}
        meta["branches"] = out
        return dict(model.state_dict()), meta

    def restore(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors, strict=False)

    def heads(self, model: torch.nn.Module) -> list[str]:
        modules = dict(model.named_modules())
        return [f"{p}.{h}" for p, a in branches(model).items() for h in a.heads(modules[p])]

    def export(self, tensors: dict[str, torch.Tensor], meta: dict[str, JsonValue], dest: str) -> list[str]:
        """Each branch in its framework's format under ``dest/<branch>/``; the rest as safetensors."""
        written: list[str] = []
        parts = meta.get("branches") or {}
        assert isinstance(parts, dict)
        rest = dict(tensors)
        for prefix, info in parts.items():
            assert isinstance(info, dict)
            sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            for k in list(rest):
                if k.startswith(prefix + "."):
                    del rest[k]
            branch_meta = info["meta"]
            assert isinstance(branch_meta, dict)
            written += get_adapter(str(info["adapter"])).export(sub, branch_meta, os.path.join(dest, prefix))
        if rest:
            written += get_adapter("plain").export(rest, {}, os.path.join(dest, "fusion"))
        return written
