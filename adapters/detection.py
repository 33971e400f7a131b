"""torchvision detection models (Faster/Mask R-CNN, RetinaNet, FCOS, SSD, ...). HF detection models (DETR,
RT-DETR, YOLOS) are HF models and go through the HF adapter, which finds their class heads."""

from __future__ import annotations

import os

import torch
from pydantic import JsonValue

__all__ = ["TorchvisionDetectionAdapter"]

_HEADS = (
    "roi_heads.box_predictor",
    "roi_heads.mask_predictor.mask_fcn_logits",
    "roi_heads.keypoint_predictor",
    "head.classification_head.cls_logits",
    "head.classification_head",
)


class TorchvisionDetectionAdapter:
    """``torchvision.models.detection`` models: state dict, class, and the number of classes."""

    name = "torchvision-detection"

    def can_handle(self, model: torch.nn.Module) -> bool:
        return type(model).__module__.startswith("torchvision.models.detection")

    def capture(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
        meta: dict[str, JsonValue] = {"framework": "torchvision", "class": type(model).__name__}
        n = _num_classes(model)
        if n is not None:
            meta["num_classes"] = n
        labels = getattr(model, "ckptkit_labels", None)  # optional label map a user attaches
        if isinstance(labels, (list, dict)):
            meta["labels"] = labels
        return dict(model.state_dict()), meta

    def restore(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors, strict=False)

    def heads(self, model: torch.nn.Module) -> list[str]:
        modules = dict(model.named_modules())
        found: list[str] = []
        for h in _HEADS:
            if h in modules and not any(h.startswith(f + ".") for f in found):
                found.append(h)
        return found

    def export(self, tensors: dict[str, torch.Tensor], meta: dict[str, JsonValue], dest: str) -> list[str]:
        """``model.pth``: a plain state dict that ``torch.load(weights_only=True)`` reads and
        ``model.load_state_dict`` takes."""
        os.makedirs(dest, exist_ok=True)
        path = os.path.join(dest, "model.pth")
        torch.save({k: v.contiguous() for k, v in tensors.items()}, path)
        return [path]


def _num_classes(model: torch.nn.Module) -> int | None:
    roi = getattr(model, "roi_heads", None)
    predictor = getattr(roi, "box_predictor", None)
    score = getattr(predictor, "cls_score", None)
    if isinstance(score, torch.nn.Linear):
        return score.out_features
    head = getattr(getattr(model, "head", None), "classification_head", None)
    n = getattr(head, "num_classes", None)
    return int(n) if isinstance(n, int) else None
