"""State layer: capture and restore of training state, and the model-adapter protocol and registry.

Adapters (``ckptkit.adapters``: HF transformers, timm, detection, fusion) are plugins of this layer, found by
:func:`find_adapter` and loaded by name on first use. Nothing here knows about storage.
"""

from ckptkit.state.adapter import ModelAdapter, find_adapter, get_adapter, register_adapter, registered
from ckptkit.state.capture import RNG, Captured, Stateful, capture, check_targets, is_data_loader, kind_of
from ckptkit.state.restore import LoadReport, Saved

__all__ = [
    "RNG",
    "Captured",
    "LoadReport",
    "ModelAdapter",
    "Saved",
    "Stateful",
    "capture",
    "check_targets",
    "find_adapter",
    "get_adapter",
    "is_data_loader",
    "kind_of",
    "register_adapter",
    "registered",
]
