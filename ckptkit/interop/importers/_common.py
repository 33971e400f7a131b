"""What every format's reader shares: the :class:`ImportRecord` it fills, describing what a file holds, checking a
state dict, the model metadata of a file that does not describe its model, JSON-safe hparams and lenient integer
progress values. Components themselves are built by the state layer (:func:`ckptkit.state.capture.model_component`,
``optimizer_component``, ``state_component``), by the same rules as a save."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import JsonValue

from ckptkit.errors import ImportFormatError
from ckptkit.hashing import file_hash
from ckptkit.state import Captured
from ckptkit.state.adapter import find_adapter

__all__ = ["ImportRecord", "as_int", "describe", "json_safe", "model_meta", "scheduler_type", "tensor_dict"]


@dataclass
class ImportRecord:
    """What one import collects: components, progress, hparams, metrics and the source record."""

    fmt: str
    path: str
    components: list[Captured] = field(default_factory=list)
    epoch: int = 0
    global_step: int = 0
    hparams: dict[str, JsonValue] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict[str, JsonValue] = field(default_factory=dict)

    def hash_file(self, path: str) -> None:
        rel = os.path.relpath(path, self.path) if os.path.isdir(self.path) else os.path.basename(path)
        self.files[rel] = file_hash(path)

    def source(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {"format": self.fmt, "path": self.path, "files": dict(self.files)}
        out.update(self.info)
        out["skipped"] = dict(self.skipped)
        out["notes"] = list(self.notes)
        return out


def describe(data: Any) -> str:
    """What a loaded file holds, in words (for errors about files that are not the checkpoint expected)."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not a dict"
    keys = [str(k) for k in data][:20]
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return (f"it is a bare state dict of {len(data)} tensors (keys {keys[:5]} ...), not a training checkpoint: "
                "load it into your model and ckptkit.save it")  # fmt: skip
    return f"it is a dict with keys {keys}"


def tensor_dict(data: Any, where: str) -> dict[str, torch.Tensor]:
    """``data`` as a state dict (names to tensors).

    Raises:
        ImportFormatError: ``data`` is not one.
    """
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ImportFormatError(f"{where} is not a mapping of names to tensors ({describe(data)}); the file is not "
                                "of the format given or detected, or was changed: pass the format it is "
                                "(import_from(format=...)), or re-save the model's state_dict() there")  # fmt: skip
    return {str(k): v for k, v in data.items()}


def json_safe(v: Any, where: str, dropped: list[str], depth: int = 0) -> JsonValue:
    """A JSON value for the manifest: tuples become lists, non-finite floats strings; tensors and objects are
    dropped (listed in ``dropped``)."""
    if depth > 50:
        dropped.append(where)
        return None
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (np.generic,)):
        return json_safe(v.item(), where, dropped, depth + 1)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return json_safe(v.item(), where, dropped, depth + 1)
    if isinstance(v, (list, tuple)):
        return [json_safe(x, f"{where}[{i}]", dropped, depth + 1) for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        return {str(k): json_safe(x, f"{where}.{k}", dropped, depth + 1) for k, x in v.items()}
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    dropped.append(where)
    return None


def model_meta(imp: ImportRecord, framework: str, model: torch.nn.Module | None,
               tensors: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, JsonValue]]:  # fmt: skip
    """Adapter name and metadata for a model the file does not describe: the given model's adapter, else ``plain``
    with the framework's name. A given model whose state dict has other keys than the file is noted."""
    if model is None:
        return "plain", {"framework": framework}
    adapter = find_adapter(model)
    live, meta = adapter.capture(model)
    missing = [k for k in live if k not in tensors]
    unexpected = [k for k in tensors if k not in live]
    if missing or unexpected:
        imp.notes.append(f"the given model's state dict differs from the file's: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
    return adapter.name, meta


def scheduler_type(sd: Any) -> str:
    """The LR scheduler class recorded for a scheduler state dict read from a file."""
    if isinstance(sd, dict) and "lr_lambdas" in sd:
        return "torch.optim.lr_scheduler.LambdaLR"
    return "torch.optim.lr_scheduler.LRScheduler"


def as_int(v: Any) -> int | None:
    """An integer progress value (epoch, step) as saved (int, float, one-element tensor), or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return int(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return int(v.item())
    return None
