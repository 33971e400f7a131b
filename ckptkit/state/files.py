"""Reading bare files other tools wrote (weights, optimizer state), without unpickling arbitrary objects."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ckptkit.errors import SourceFormatError, SourceNotFoundError, StateMismatchError, UnsupportedStateError
from ckptkit.state.restore import LoadReport, Saved, prepare_model, restore_model

__all__ = ["check_optimizer_file", "load_model_tensors", "prepare_model_tensors", "read_safetensors",
           "read_tensor_file", "read_torch_file"]  # fmt: skip


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


def prepare_model_tensors(
    name: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], strict: bool
) -> tuple[LoadReport, Callable[[], object]]:
    """Check a flat tensor mapping against ``model`` (keys, shapes) and return the report and the load, which
    changes nothing until called."""
    return prepare_model(name, model, Saved("model", None, tensors, {}, None, {}), strict)


def check_optimizer_file(path: str, osd: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``osd`` (read from ``path``) as an optimizer ``state_dict()`` that fits ``optimizer``: the same number of
    param groups and of parameters in each, and every per-parameter state tensor shaped like its parameter.

    Raises:
        SourceFormatError: it is not an optimizer state dict.
        StateMismatchError: it does not fit ``optimizer`` (nothing was loaded).
    """
    if not (isinstance(osd, dict) and isinstance(osd.get("state"), dict) and isinstance(osd.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in osd["param_groups"])):
        raise SourceFormatError(f"{path} is not an optimizer state dict (expected 'state' and 'param_groups', each "
                                "group with its 'params'): save optimizer.state_dict()")  # fmt: skip
    groups = optimizer.param_groups
    fix = "pass the optimizer file written for this model and optimizer (same parameter groups, same order)"
    if len(osd["param_groups"]) != len(groups):
        raise StateMismatchError("optimizer", f"{path} has {len(osd['param_groups'])} parameter group(s), the "
                                 f"optimizer {len(groups)}", fix)  # fmt: skip
    params: dict[Any, torch.Tensor] = {}
    for g, (saved, live) in enumerate(zip(osd["param_groups"], groups, strict=True)):
        if len(saved["params"]) != len(live["params"]):
            raise StateMismatchError("optimizer", f"{path}: group {g} has {len(saved['params'])} parameters, the "
                                     f"optimizer's {len(live['params'])}", fix)  # fmt: skip
        params.update(zip(saved["params"], live["params"], strict=True))
    for pid, st in osd["state"].items():
        p = params.get(pid)
        if p is None:
            raise StateMismatchError("optimizer", f"{path} has state for parameter {pid!r}, which no group lists", fix)
        if not isinstance(st, dict):
            raise SourceFormatError(f"{path}: the state of parameter {pid!r} is a {type(st).__name__}, not a dict")
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise StateMismatchError("optimizer", f"{path}: parameter {pid!r}'s {k} has shape {list(v.shape)}, "
                                         f"the parameter {list(p.shape)}", fix)  # fmt: skip
    return osd
