"""Reading bare files other tools wrote (weights, optimizer state), without unpickling arbitrary objects."""

from __future__ import annotations

import os
from typing import Any

import torch

from ckptkit.errors import SourceFormatError, SourceNotFoundError, UnsupportedStateError
from ckptkit.state.restore import LoadReport, Saved, restore_model

__all__ = ["load_model_tensors", "read_safetensors", "read_tensor_file", "read_torch_file"]


def read_torch_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    if not os.path.isfile(path):
        raise SourceNotFoundError(path, "file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or others for what it refuses
        why = (str(err).splitlines() or [type(err).__name__])[0]
        raise UnsupportedStateError(
            path, "a pickled object", f"torch.load(weights_only=True) refused it ({why}); "
            "only tensors and plain containers are read: re-save it as a state_dict of tensors or as safetensors",
        ) from err


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; a damaged one is a :class:`SourceFormatError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise SourceNotFoundError(path, "file")
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SourceFormatError(f"{path} is not a readable safetensors file ({err}); copy it again from its "
                                "source, or re-save it with safetensors.torch.save_file") from err


def read_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a ``.safetensors`` file or a torch file of tensors."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    data = read_torch_file(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise SourceFormatError(f"{path} does not hold a mapping of names to tensors (found {type(data).__name__}): "
                                "save model.state_dict() or a safetensors file")
    return {str(k): v for k, v in data.items()}


def load_model_tensors(name: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], strict: bool) -> LoadReport:
    """Load a flat tensor mapping into ``model`` with the same checks and report as a checkpoint restore."""
    return restore_model(name, model, Saved("model", None, tensors, {}, None, {}), strict)
