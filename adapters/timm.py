"""timm image models: the state dict plus the model name and timm's pretrained config (which names the head)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from pydantic import JsonValue
from safetensors.torch import save_file

__all__ = ["TimmAdapter"]


def _cfg(model: torch.nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    return dict(cfg) if isinstance(cfg, dict) and cfg.get("architecture") else None


class TimmAdapter:
    """timm models: recognised by their ``pretrained_cfg`` and module, so timm is not imported to check."""

    name = "timm"

    def can_handle(self, model: torch.nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and _cfg(model) is not None

    def capture(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
        cfg = _cfg(model) or {}
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        # timm's pretrained_cfg keeps the default head size (1000); the exported weights have this model's, and
        # timm drops a classifier whose size differs from the cfg's, so record the real one.
        cfg = {**cfg, "num_classes": num_classes}
        meta: dict[str, JsonValue] = {
            "framework": "timm",
            "architecture": cfg["architecture"],
            "num_classes": num_classes,
            "pretrained_cfg": json.loads(json.dumps(cfg, default=str)),
        }
        return dict(model.state_dict()), meta

    def restore(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors, strict=False)

    def heads(self, model: torch.nn.Module) -> list[str]:
        """The classifier named by timm's own metadata (``pretrained_cfg['classifier']``), never guessed."""
        cfg = _cfg(model) or {}
        classifier = cfg.get("classifier")
        names = [classifier] if isinstance(classifier, str) else list(classifier or [])
        modules = dict(model.named_modules())
        return [n for n in names if n in modules]

    def export(self, tensors: dict[str, torch.Tensor], meta: dict[str, JsonValue], dest: str) -> list[str]:
        """``model.safetensors`` and timm's config.json. Load with ``timm.create_model(arch, pretrained=True,
        pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=N))`` (N from config.json)."""
        os.makedirs(dest, exist_ok=True)
        weights = os.path.join(dest, "model.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, weights)
        config = os.path.join(dest, "config.json")
        cfg: Any = meta.get("pretrained_cfg") or {}
        with open(config, "w") as f:
            json.dump({"architecture": meta["architecture"], "num_classes": meta["num_classes"],
                       "pretrained_cfg": cfg}, f, indent=2)  # fmt: skip
        return [weights, config]
