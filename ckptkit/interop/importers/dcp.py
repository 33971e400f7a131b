"""The ``dcp`` format: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``), read by DCP's own
reader into tensors pre-allocated from the metadata. ``torch.distributed.checkpoint`` is imported only when such a
folder is read."""

from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import warnings
import zipfile
from typing import Any

import torch

from ckptkit.errors import ImportFormatError, UnsupportedStateError
from ckptkit.interop.importers._common import ImportRecord, as_int, model_meta, scheduler_type, tensor_dict
from ckptkit.interop.importers._optimizer import check_optimizer_dict, name_optimizer
from ckptkit.interop.importers._pickle import GENERIC_HINT, RefusedPickleError, refusal, unsafe_globals
from ckptkit.state import RNG
from ckptkit.state.capture import model_component, optimizer_component, state_component

__all__ = ["read_dcp"]

_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_CLASSES = {
    (_DCP_META, "Metadata"), (_DCP_META, "TensorStorageMetadata"), (_DCP_META, "BytesStorageMetadata"),
    (_DCP_META, "ChunkStorageMetadata"), (_DCP_META, "TensorProperties"), (_DCP_META, "MetadataIndex"),
    (_DCP_META, "StorageMeta"), (_DCP_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
}  # fmt: skip


class _Refused(pickle.UnpicklingError):
    """A global outside the allowlist (or a persistent id), refused before anything is imported."""


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata dataclasses and the torch types they hold (dtypes, Size, layout); any other
    global is refused before it is imported. (torch's own weights-only unpickler reads protocol 2 only; DCP writes
    ``.metadata`` with the default protocol.)"""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_CLASSES:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent id")


_DAMAGED = "the checkpoint is damaged or was not written by torch.distributed.checkpoint: re-save it with dcp.save"


def _dcp_metadata(folder: str) -> Any:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        md = _DcpMetadataUnpickler(io.BytesIO(raw)).load()
    except _Refused as err:
        found = unsafe_globals(raw) if raw[:1] == b"\x80" else []
        bad = [g for g in found if tuple(g.rsplit(".", 1)) not in _DCP_CLASSES] or [str(err)]
        raise RefusedPickleError(
            f"cannot import {path}: it needs {', '.join(bad)}, which is not one of DCP's metadata classes; ckptkit "
            "unpickles DCP metadata with an allowlist of those classes only, because unpickling can run any code. "
            "Re-save the checkpoint with torch.distributed.checkpoint from a state dict of tensors and plain values",
            path,
            ", ".join(bad),
        ) from err
    except Exception as err:  # truncated or not a pickle: pickle raises many types for malformed data
        raise ImportFormatError(f"{path} cannot be read as DCP metadata ({type(err).__name__}: {err}): "
                                f"{_DAMAGED}") from err  # fmt: skip
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise ImportFormatError(f"{path} does not hold DCP Metadata (found {type(md).__name__}): {_DAMAGED}")
    for k, v in md.state_dict_metadata.items():
        if not isinstance(k, str) or not isinstance(v, (TensorStorageMetadata, BytesStorageMetadata)):
            raise ImportFormatError(f"{path}: entry {k!r} has unexpected metadata {type(v).__name__}: {_DAMAGED}")
        if isinstance(v, TensorStorageMetadata) and not (
            isinstance(v.properties.dtype, torch.dtype) and all(isinstance(s, int) and s >= 0 for s in v.size)
        ):
            raise ImportFormatError(f"{path}: entry {k!r} has malformed tensor metadata: {_DAMAGED}")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise ImportFormatError(f"{path} points at a data file outside the checkpoint folder: {rel!r}; ckptkit "
                                    f"reads only files inside it: {_DAMAGED}")  # fmt: skip
    return md


def _dcp_load(folder: str, md: Any) -> dict[str, Any]:
    """Every entry of a DCP checkpoint, read by DCP's own reader into tensors pre-allocated from the metadata;
    non-tensor entries with ``torch.load(weights_only=True)``. Returns the nested state dict as saved."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    values: dict[str, Any] = {}  # non-tensor entries (tensors are copied into the pre-allocated ones in place)
    errors: list[Exception] = []  # raised after the load: DCP wraps what is raised inside it

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            raw = value.getvalue()
            try:
                values[fqn] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            except Exception as err:
                where = f"{folder} entry {fqn!r}"
                refused = refusal(where, _zip_pickle(raw), GENERIC_HINT, f"{fqn}.")
                errors.append(refused or UnsupportedStateError(
                    where, "a pickled object", f"torch.load(weights_only=True) refused it ({err})"))  # fmt: skip

    flat: dict[str, Any] = {}
    for k, v in md.state_dict_metadata.items():
        flat[k] = torch.empty(tuple(v.size), dtype=v.properties.dtype) if isinstance(v, TensorStorageMetadata) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming ... a single process"
        dcp_load(flat, storage_reader=Reader(folder), planner=Planner(flatten_state_dict=False), no_dist=True)
    if errors:
        raise errors[0]
    flat.update(values)
    mappings = md.planner_data if isinstance(md.planner_data, dict) else {}
    root: dict[str, Any] = {}
    for k, v in flat.items():
        path = mappings.get(k, (k,))
        if not isinstance(path, (tuple, list)) or not path or not all(isinstance(p, (str, int)) for p in path):
            path = (k,)
        _set_path(root, list(path), v, folder)
    return root


def _zip_pickle(raw: bytes) -> bytes | None:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            return zf.read(pkl[0]) if pkl else None
    except zipfile.BadZipFile:
        return raw


def _set_path(root: dict[str, Any], path: list[str | int], value: Any, folder: str) -> None:
    cur: Any = root
    for i, part in enumerate(path[:-1]):
        nxt: Any = [] if isinstance(path[i + 1], int) else {}
        if isinstance(cur, list) and isinstance(part, int):
            while len(cur) <= part:
                cur.append(None)
            if cur[part] is None:
                cur[part] = nxt
            cur = cur[part]
        elif isinstance(cur, dict):
            cur = cur.setdefault(part, nxt)
        else:
            raise ImportFormatError(f"{folder}/.metadata: planner data path {path} does not fit the entries saved: "
                                    f"{_DAMAGED}")  # fmt: skip
    last = path[-1]
    if isinstance(cur, list) and isinstance(last, int):
        while len(cur) <= last:
            cur.append(None)
        cur[last] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise ImportFormatError(f"{folder}/.metadata: planner data path {path} does not fit the entries saved: "
                                f"{_DAMAGED}")  # fmt: skip


_DCP_MODEL = ("model", "model_state_dict", "state_dict", "module")
_DCP_OPTIM = ("optimizer", "optim", "optimizer_state_dict")
_DCP_SCHED = ("scheduler", "lr_scheduler")


def read_dcp(imp: ImportRecord, _data: Any, model: torch.nn.Module | None) -> None:
    """Read the DCP folder ``imp.path`` into ``imp``: model, optimizer, scheduler, progress and plain entries."""
    folder = imp.path
    for fname in sorted(os.listdir(folder)):
        p = os.path.join(folder, fname)
        if os.path.isfile(p):
            imp.hash_file(p)
    md = _dcp_metadata(folder)
    imp.info["dcp_version"] = str(getattr(md, "version", None) or "unknown")
    sd = _dcp_load(folder, md)
    used: set[str] = set()
    tensors: dict[str, torch.Tensor] = {}
    mkey = next((k for k in _DCP_MODEL if isinstance(sd.get(k), dict)), None)
    if mkey is not None:
        used.add(mkey)
        tensors = tensor_dict(sd[mkey], f"{folder} entry {mkey!r}")
        adapter, meta = model_meta(imp, "torch", model, tensors)
        imp.components.append(model_component("model", tensors, model, adapter=adapter, meta=meta))
    else:
        imp.notes.append(f"no model entry ({', '.join(_DCP_MODEL)}) in the checkpoint")
    okey = next((k for k in _DCP_OPTIM if isinstance(sd.get(k), dict)), None)
    if okey is not None:
        used.add(okey)
        osd = check_optimizer_dict(sd[okey], f"{folder} entry {okey!r}")
        params = [p for g in osd["param_groups"] for p in g["params"]]
        if params and all(isinstance(p, str) for p in params):
            # get_optimizer_state_dict / get_state_dict: already keyed by parameter name (FQN)
            missing = [p for p in params if tensors and p not in tensors]
            if missing:
                imp.notes.append(f"optimizer names parameters the model entry lacks: {missing[:5]}")
            groups = [list(g["params"]) for g in osd["param_groups"]]
            imp.components.append(optimizer_component("optimizer", osd, groups))
            imp.notes.append("optimizer: keyed by parameter name in the checkpoint itself (DCP get_state_dict)")
        else:
            # optimizer.state_dict(): positions; DCP turned the state's integer keys into strings
            osd = {**osd, "state": {(int(k) if isinstance(k, str) and k.isdigit() else k): v
                                    for k, v in osd["state"].items()}}  # fmt: skip
            imp.components.append(name_optimizer(imp, "optimizer", osd, f"{folder} entry {okey!r}", model, tensors))
    skey = next((k for k in _DCP_SCHED if isinstance(sd.get(k), dict)), None)
    if skey is not None:
        used.add(skey)
        imp.components.append(state_component("scheduler", "scheduler", scheduler_type(sd[skey]), sd[skey]))
    for key, attr in (("global_step", "global_step"), ("step", "global_step"), ("epoch", "epoch")):
        v = as_int(sd.get(key))
        if key in sd and v is not None and not isinstance(sd[key], dict):
            used.add(key)
            setattr(imp, attr, v)
    imp.info["progress"] = {"epoch": imp.epoch, "global_step": imp.global_step,
                            "epoch_meaning": "top-level 'epoch' / 'step' / 'global_step' entries, as is"}  # fmt: skip
    for key, v in sd.items():
        if key in used:
            continue
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", key) and key != RNG:
            try:
                imp.components.append(state_component(key, "value", type(v).__name__, v))
                continue
            except UnsupportedStateError as err:
                imp.skipped[key] = str(err)
                continue
        imp.skipped[key] = "entry name is not a valid component name: not imported"
