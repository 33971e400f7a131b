"""Fingerprints of what a run trains on, for the data manifest: the same data gives the same fingerprint,
any change to a sample, a file or the order of sample ids gives another.

Example:
    >>> fingerprint(["img-001", "img-002"]) == fingerprint(["img-001", "img-002"])
    True
    >>> fingerprint(["img-001", "img-002"]) == fingerprint(["img-002", "img-001"])
    False
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import blake3
import torch

from ckptkit.errors import ArgumentTypeError
from ckptkit.schema import DataSegment

__all__ = ["fingerprint", "segment"]


def fingerprint(data: Any, *, content: bool = True) -> str:
    """A blake3 fingerprint of a dataset description.

    Accepts: an object with a ``fingerprint()`` method (your hook); an HF ``datasets.Dataset`` (its own
    ``_fingerprint``); a pandas DataFrame (values, index, columns and dtypes); a list of files (name and size,
    plus the content hash when ``content`` is true, else the modification time); a list of sample ids; tensors,
    a ``TensorDataset`` or numpy arrays (their bytes).

    Raises:
        ArgumentTypeError: nothing here knows how to fingerprint ``data`` (say how with a ``fingerprint()`` method).
    """
    hook = getattr(data, "fingerprint", None)
    if callable(hook):
        return _h("hook", str(hook()))
    hf = getattr(data, "_fingerprint", None)
    if isinstance(hf, str) and type(data).__module__.startswith("datasets"):
        return _h("hf-datasets", hf)
    if type(data).__module__.startswith("pandas") and type(data).__name__ == "DataFrame":
        import pandas as pd

        rows = pd.util.hash_pandas_object(data, index=True).to_numpy()
        meta = json.dumps([[str(c), str(t)] for c, t in data.dtypes.items()])
        return _h("pandas", meta, rows.tobytes())
    if isinstance(data, torch.utils.data.TensorDataset):
        return _h("tensors", *(_tensor_bytes(t) for t in data.tensors))
    if isinstance(data, torch.Tensor):
        return _h("tensor", _tensor_bytes(data))
    if type(data).__module__ == "numpy" and hasattr(data, "tobytes"):
        return _h("numpy", str(data.dtype), str(data.shape), data.tobytes())
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        items = list(data)
        if items and all(isinstance(p, (str, os.PathLike)) and os.path.isfile(p) for p in items):
            return _h("files", *(_file(os.fspath(p), content) for p in items))
        if all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items):
            return _h("ids", json.dumps(items))
    raise ArgumentTypeError(
        f"cannot fingerprint a {type(data).__module__}.{type(data).__qualname__}: pass sample ids, files, a "
        "DataFrame, an HF Dataset or tensors, or give your dataset a fingerprint() method"
    )


def segment(
    data: Any, name: str, *, uri: str | None = None, split: str | None = None, content: bool = True
) -> DataSegment:
    """A :class:`~ckptkit.schema.DataSegment` for ``data``: its fingerprint and size (when it has a length)."""
    size = len(data) if hasattr(data, "__len__") else None
    return DataSegment(name=name, uri=uri, split=split, size=size, fingerprint=fingerprint(data, content=content))


def _h(kind: str, *parts: str | bytes) -> str:
    h = blake3.blake3()
    h.update(kind.encode())
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return f"{kind}:{h.hexdigest()}"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{list(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _file(path: str, content: bool) -> str:
    st = os.stat(path)
    if content:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        h.update_mmap(path)
        return f"{os.path.basename(path)}:{st.st_size}:{h.hexdigest()}"
    return f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}"
