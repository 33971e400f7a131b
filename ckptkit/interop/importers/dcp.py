"""The ``dcp`` format: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``), read by DCP's own
reader into tensors pre-allocated from the metadata. ``torch.distributed.checkpoint`` is imported only when such a
folder is read."""

from __future__ import annotations

import importlib
import io
import math
import os
import pickle
import re
import warnings
import zipfile
from typing import Any

import torch

from ckptkit.errors import CkptkitError, ImportFormatError, UnsupportedStateError
from ckptkit.hashing import is_name
from ckptkit.interop.importers._common import ImportRecord, as_int, model_meta, scheduler_type, tensor_dict
from ckptkit.interop.importers._optimizer import check_optimizer_dict, name_optimizer
from ckptkit.interop.importers._pickle import (
    GENERIC_HINT,
    INFLATE_RATIO,
    RefusedPickleError,
    check_archive,
    data_globals,
    refusal,
    unsafe_globals,
)
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
    if not raw:
        raise ImportFormatError(f"{path} is empty: {_DAMAGED}")
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
    _check_storage(folder, path, md)
    return md


def _check_storage(folder: str, path: str, md: Any) -> None:
    """Before DCP reads anything: every record lies inside its data file, no record is an archive that inflates far
    beyond its size (:func:`check_archive`), and the tensors the metadata declares fit in the data files (they are
    allocated from the metadata before they are read, so a small forged ``.metadata`` must not allocate terabytes)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    storage = md.storage_data if isinstance(md.storage_data, dict) else {}
    sizes: dict[str, int] = {}
    transformed = False
    for index, info in storage.items():
        data = os.path.join(folder, info.relative_path)
        if data not in sizes:
            if not os.path.isfile(data):
                raise ImportFormatError(f"{path} names data file {info.relative_path!r}, which is not in {folder}: "
                                        f"{_DAMAGED}")  # fmt: skip
            sizes[data] = os.path.getsize(data)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        fqn = getattr(index, "fqn", index)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0
                and 0 <= length <= sizes[data] - offset):  # fmt: skip
            raise ImportFormatError(f"{path}: entry {fqn!r} is stored at bytes {offset!r}+{length!r} of "
                                    f"{info.relative_path}, which holds {sizes[data]} bytes: {_DAMAGED}")  # fmt: skip
        if getattr(info, "transform_descriptors", None):
            transformed = True  # compressed by a DCP extension: not an archive ckptkit can measure
            continue
        with open(data, "rb") as f:
            check_archive(_Slice(f, offset, length), f"{data} (entry {fqn!r})", length)
    declared = 0
    for v in md.state_dict_metadata.values():
        if isinstance(v, TensorStorageMetadata):
            declared += math.prod(v.size) * torch.empty((), dtype=v.properties.dtype).element_size()
    room = sum(sizes.values()) * (INFLATE_RATIO if transformed else 1) + (1 << 20)
    if declared > room:
        raise ImportFormatError(f"{path} declares {declared} bytes of tensors, but its data files hold "
                                f"{sum(sizes.values())} bytes: {_DAMAGED}")  # fmt: skip


class _Slice(io.RawIOBase):
    """Bytes ``offset`` to ``offset + length`` of an open file, as a seekable file of their own (a DCP record)."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = min(max(base + pos, 0), self._len)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(view[:n])
        self._pos += got or 0
        return got or 0


def _dcp_load(folder: str, md: Any) -> dict[str, Any]:
    """Every entry of a DCP checkpoint, read by DCP's own reader into tensors pre-allocated from the metadata;
    non-tensor entries with ``torch.load(weights_only=True)`` (plus the data-only globals of
    :func:`~ckptkit.interop.importers._pickle.load_torch`). Returns the nested state dict as saved."""
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
                with torch.serialization.safe_globals(data_globals()):
                    values[fqn] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            except Exception as err:
                where = f"{folder} entry {fqn!r}"
                refused = refusal(where, _zip_pickle(raw), GENERIC_HINT, f"{fqn}.")
                errors.append(refused or UnsupportedStateError(
                    where, "a pickled object", f"torch.load(weights_only=True) refused it ({err})"))  # fmt: skip

    flat: dict[str, Any] = {}
    for k, v in md.state_dict_metadata.items():
        flat[k] = torch.empty(tuple(v.size), dtype=v.properties.dtype) if isinstance(v, TensorStorageMetadata) else None
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming ... a single process"
            dcp_load(flat, storage_reader=Reader(folder), planner=Planner(flatten_state_dict=False), no_dist=True)
    except (CheckpointException, Exception) as err:  # DCP wraps what its reader raised (a BaseException)
        if errors:
            raise errors[0] from err
        causes = [f[0] for f in err.failures.values()] if isinstance(err, CheckpointException) else [err]
        cause = next((c for c in causes if isinstance(c, (KeyboardInterrupt, CkptkitError))), causes[0] if causes
                     else err)  # fmt: skip
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        if isinstance(cause, CkptkitError):
            raise cause from err
        detail = " ".join(str(cause).split()[:40]) or "no message"
        raise ImportFormatError(f"{folder}: its data files cannot be read ({type(cause).__name__}: {detail[:300]}): "
                                f"{_DAMAGED}") from err  # fmt: skip
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


def _one_writer(md: Any) -> bool:
    """Whether one rank wrote the checkpoint (its data files all ``__0_<n>.distcp``): only then does the metadata
    list the tensors in the order of the state dict saved. With several ranks, DCP spreads replicated tensors over
    the ranks and lists them in write order."""
    infos = getattr(md, "storage_data", None)
    if not isinstance(infos, dict) or not infos:
        return False
    ranks = set()
    for info in infos.values():
        found = re.fullmatch(r"__(\d+)_\d+\.distcp", str(getattr(info, "relative_path", "")))
        if found is None:
            return False
        ranks.add(found.group(1))
    return len(ranks) == 1


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
            ordered = _one_writer(md)
            if not ordered and model is None:
                imp.notes.append(
                    "optimizer: written by several ranks, so DCP lists the model's tensors in write order, not "
                    "parameter order; its numbered parameters are not named by that order (it would swap state "
                    "between same-shaped parameters): pass model= to name them, or save with "
                    "torch.distributed.checkpoint.state_dict.get_state_dict (keyed by name)"
                )
            imp.components.append(name_optimizer(imp, "optimizer", osd, f"{folder} entry {okey!r}", model, tensors,
                                                 order_is_parameter_order=ordered))  # fmt: skip
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
        if is_name(key) and not key.endswith(".json") and key != RNG:  # the rule every component name follows
            try:
                imp.components.append(state_component(key, "value", type(v).__name__, v))
                continue
            except UnsupportedStateError as err:
                imp.skipped[key] = str(err)
                continue
        imp.skipped[key] = "entry name is not a valid component name: not imported"
