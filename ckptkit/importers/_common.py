"""What every format's reader shares: the :class:`_Import` record, the format error, recognising a checkpoint dict,
the model / stateful component builders, JSON-safe hparams and lenient integer progress values."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import JsonValue

from ckptkit.adapter import find_adapter
from ckptkit.errors import CkptkitError
from ckptkit.files import file_hash
from ckptkit.format import encode
from ckptkit.schema import ComponentKind
from ckptkit.state import Captured


class ImportFormatError(CkptkitError, ValueError):
    """The source is not a layout :func:`import_from` knows, or does not hold what its format promises."""

    __module__ = "ckptkit.importers"  # where users import it from (repr, pickling), as before the split


@dataclass
class _Import:
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


def _detect_dict(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    keys = set(data)
    if "pytorch-lightning_version" in keys or {"state_dict", "optimizer_states"} <= keys:
        return "lightning"
    if isinstance(data.get("meta"), dict) and "state_dict" in keys:
        return "mmdet"
    if "arch" in keys and ("state_dict" in keys or "state_dict_ema" in keys):
        return "timm"
    return None


def _describe(data: Any) -> str:
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not a dict"
    keys = [str(k) for k in data][:20]
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return (f"it is a bare state dict of {len(data)} tensors (keys {keys[:5]} ...), not a training checkpoint: "
                "load it into your model and ckptkit.save it")  # fmt: skip
    return f"it is a dict with keys {keys}"


def _tensor_dict(data: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ImportFormatError(f"{where} is not a mapping of names to tensors ({_describe(data)})")
    return {str(k): v for k, v in data.items()}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _json_safe(v: Any, where: str, dropped: list[str], depth: int = 0) -> JsonValue:
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
        return _json_safe(v.item(), where, dropped, depth + 1)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _json_safe(v.item(), where, dropped, depth + 1)
    if isinstance(v, (list, tuple)):
        return [_json_safe(x, f"{where}[{i}]", dropped, depth + 1) for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x, f"{where}.{k}", dropped, depth + 1) for k, x in v.items()}
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    dropped.append(where)
    return None


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share storage (tied weights) are stored once; the others become aliases, as a save does."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in tensors.items():
        if t.numel() > 0:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                     t.dtype)  # fmt: skip
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        unique[key] = t
    return unique, aliases


def _model_component(
    name: str,
    tensors: dict[str, torch.Tensor],
    adapter: str,
    meta: dict[str, JsonValue],
    type_: str,
    skeleton: torch.nn.Module | None = None,
) -> Captured:
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ImportFormatError(f"model state {name!r} holds non-tensor values at {bad[:5]}")
    unique, aliases = _dedupe(tensors)
    if skeleton is not None:
        trainable = {n for n, p in skeleton.named_parameters(remove_duplicate=False) if p.requires_grad}
        params = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)}
        classes = {k: ("trainable" if k in trainable else "frozen" if k in params else "buffer") for k in unique}
    else:
        classes = {k: ("trainable" if t.is_floating_point() else "buffer") for k, t in unique.items()}
    return Captured(name, "model", type_, None, unique, classes, aliases, adapter, meta)


def _stateful_component(name: str, kind: ComponentKind, type_: str, state: Any) -> Captured:
    enc = encode(state, name)
    return Captured(name, kind, type_, enc.json, enc.tensors, {k: "state" for k in enc.tensors})


def _plain_model_meta(imp: _Import, framework: str, model: torch.nn.Module | None,
                      tensors: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, JsonValue], str]:  # fmt: skip
    """Adapter name, metadata and type for a model the file does not describe (the given model's adapter if any)."""
    if model is None:
        return "plain", {"framework": framework}, "torch.nn.Module"
    adapter = find_adapter(model)
    live, meta = adapter.capture(model)
    missing = [k for k in live if k not in tensors]
    unexpected = [k for k in tensors if k not in live]
    if missing or unexpected:
        imp.notes.append(f"the given model's state dict differs from the file's: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
    return adapter.name, meta, _qualname(type(model))


def _scheduler_type(sd: Any) -> str:
    if isinstance(sd, dict) and "lr_lambdas" in sd:
        return "torch.optim.lr_scheduler.LambdaLR"
    return "torch.optim.lr_scheduler.LRScheduler"


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return int(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return int(v.item())
    return None
