"""Content hashes of tensors, the way the catalog matches exported weights against indexed checkpoints.

A manifest names each tensor's *object* (the blake3 of a whole safetensors file of many tensors), not the tensor
itself, and an exported folder packs tensors differently, so the catalog hashes each tensor on its own::

    tensor_hash = blake3(canonical_json([dtype, shape]) + b"\\n" + the tensor's bytes as stored)

``dtype`` is the safetensors name (``F32``, ``BF16``...), ``shape`` a list of ints, the bytes little-endian and
contiguous (the safetensors layout, which is how ckptkit stores every tensor). Names are left out: an export may
rename keys (an HF prefix, a fusion branch). Both sides are read without torch: safetensors is an 8-byte header
length, a JSON header of ``{key: {dtype, shape, data_offsets}}`` and the data.

Example:
    >>> import json, struct
    >>> head = json.dumps({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    >>> blob = struct.pack("<Q", len(head)) + head + b"\\x01\\x02"
    >>> hashes = safetensors_hashes(blob, "w.safetensors")
    >>> hashes["w"].tensor_hash == tensor_hash("U8", [2], b"\\x01\\x02")
    True
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3

from ckptkit.errors import CorruptObjectError, SourceFormatError, SourceNotFoundError
from ckptkit.schema import canonical_json

__all__ = ["TensorHash", "file_tensor_hashes", "safetensors_hashes", "tensor_hash"]

_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}  # fmt: skip


@dataclass(frozen=True)
class TensorHash:
    """One tensor's content hash, with its dtype and shape."""

    tensor_hash: str
    dtype: str
    shape: tuple[int, ...]


def tensor_hash(dtype: str, shape: list[int] | tuple[int, ...], data: bytes | memoryview) -> str:
    """The content hash of one tensor (see the module's docstring)."""
    h = blake3.blake3(canonical_json([dtype, list(shape)]) + b"\n")
    h.update(data)
    return str(h.hexdigest())


def safetensors_hashes(buf: bytes | bytearray | memoryview, where: str) -> dict[str, TensorHash]:
    """Every tensor of the safetensors bytes ``buf``, by key, with its content hash.

    Raises:
        CorruptObjectError: ``buf`` is not a safetensors file (the message names ``where``).
    """
    view = memoryview(buf)
    if len(view) < 8:
        raise CorruptObjectError(where, "a safetensors file", f"{len(view)} bytes", "too short")
    (hlen,) = struct.unpack_from("<Q", view, 0)
    if hlen > len(view) - 8:
        raise CorruptObjectError(where, f"a header of {hlen} bytes", f"{len(view) - 8} bytes after its length")
    try:
        header = json.loads(bytes(view[8 : 8 + hlen]))
    except (ValueError, RecursionError) as err:
        raise CorruptObjectError(where, "a JSON header", "unparseable bytes", str(err)[:200]) from err
    if not isinstance(header, dict):
        raise CorruptObjectError(where, "a JSON object header", type(header).__name__)
    base = 8 + hlen
    out: dict[str, TensorHash] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for s in shape:
                numel *= s
            size = numel * _ITEMSIZE[dtype] if dtype in _ITEMSIZE else -1
            ok = 0 <= start <= end <= len(view) - base and end - start == size
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptObjectError(where, "a valid tensor entry", repr(info)[:100], f"key {key!r}") from err
        if not ok:
            raise CorruptObjectError(where, f"a valid tensor entry for {key!r}", repr(info)[:100])
        out[key] = TensorHash(tensor_hash(dtype, shape, view[base + start : base + end]), dtype, shape)
    return out


def file_tensor_hashes(path: str | os.PathLike[str]) -> dict[str, TensorHash]:
    """The tensors of a ``.safetensors`` file, or of every ``*.safetensors`` file in a folder (an exported HF
    folder, sharded or not), by key (``file:key`` when two files hold the same key).

    Raises:
        SourceNotFoundError: ``path`` does not exist.
        SourceFormatError: it holds no ``.safetensors`` file (a ``.bin``/``.pt`` export is not read: convert it,
            or import it with ``ckptkit import-files`` and look it up by checkpoint).
        CorruptObjectError: a file is not safetensors.
    """
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(str(p), "safetensors file or folder")
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise SourceFormatError(f"{p} holds no .safetensors file: `find` reads safetensors weights (an exported HF "
                                "folder or a model.safetensors); convert a .bin/.pt export first")  # fmt: skip
    out: dict[str, TensorHash] = {}
    for f in files:
        for key, th in safetensors_hashes(f.read_bytes(), str(f)).items():
            out[key if key not in out else f"{f.name}:{key}"] = th
    return out
