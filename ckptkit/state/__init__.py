"""State layer: capture and restore of training state, and the model-adapter protocol and registry.

Adapters (``ckptkit.adapters``: HF transformers, timm, detection, fusion) are plugins of this layer, found by
:func:`find_adapter` and loaded by name on first use. Nothing here knows about storage.
"""

from ckptkit.state.adapter import ModelAdapter, find_adapter, get_adapter, register_adapter, registered
from ckptkit.state.capture import RNG, Captured, Stateful, capture, check_targets, is_data_loader, kind_of
from ckptkit.state.restore import LoadReport, Saved
from ckptkit.state.schedulers import advance_scheduler, extend_total, hold_lr, is_held

__all__ = [
    "RNG",
    "Captured",
    "LoadReport",
    "ModelAdapter",
    "Saved",
    "Stateful",
    "advance_scheduler",
    "capture",
    "check_targets",
    "extend_total",
    "find_adapter",
    "get_adapter",
    "hold_lr",
    "is_data_loader",
    "is_held",
    "kind_of",
    "register_adapter",
    "registered",
]
