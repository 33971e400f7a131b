"""Manifest <-> objects: typed JSON for values, deterministic safetensors objects for tensors.

Nothing here pickles. Values are encoded as JSON with a few tags for what JSON lacks (``{"$tuple": [...]}``,
``{"$float": "nan"}``, ``{"$tensor": key}`` ...); anything else is refused with
:class:`~ckptkit.errors.UnsupportedStateError` naming where it was found.

Tensors are packed into safetensors objects whose bytes depend only on the tensors they hold (sorted keys,
no timestamps, fixed layout), so an unchanged module produces a byte-identical object and is stored once.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import ckptkit.codecs  # noqa: F401  (registers the decoders of compressed objects with the storage layer)
from ckptkit.errors import CorruptObjectError, ManifestError, UnsupportedStateError
from ckptkit.hashing import hasher

__all__ = [
    "DEFAULT_OBJECT_SIZE",
    "Encoded",
    "PackedObject",
    "decode",
    "dtype_code",
    "encode",
    "group",
    "pack",
    "unpack",
]

# --- dtypes ------------------------------------------------------------------------------------------------

_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.complex64: "C64",
}  # fmt: skip
for _name, _code in [("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")]:  # fmt: skip
    if hasattr(torch, _name):  # newer dtypes: present in every torch ckptkit supports, checked anyway
        _DTYPES[getattr(torch, _name)] = _code
_TORCH_DTYPES = {code: dt for dt, code in _DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UnsupportedStateError(f"a tensor of dtype {dtype}", str(dtype), "safetensors cannot store it; "
                                    "cast it to a supported dtype first") from None


# --- typed JSON --------------------------------------------------------------------------------------------

_TAGS = ("$tensor", "$tuple", "$float", "$bytes", "$dict", "$np", "$dtype", "$set")


@dataclass
class Encoded:
    """A value split into its JSON part and its tensors (keyed as the JSON refers to them)."""

    json: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(value: Any, where: str) -> Encoded:
    """Split ``value`` into typed JSON and tensors. ``where`` names it in errors (e.g. ``"optimizer"``)."""
    out = Encoded(None)
    out.json = _enc(value, where, out.tensors, 0)
    return out


MAX_DEPTH = 100
"""How deeply a value may nest (containers in containers): what :func:`encode` stores, :func:`decode` reads back;
deeper JSON in a manifest is refused before it can exhaust the interpreter's stack."""


def _enc(v: Any, path: str, tensors: dict[str, torch.Tensor], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise UnsupportedStateError(path, f"a value nested deeper than {MAX_DEPTH} levels",
                                    f"flatten it: ckptkit stores values nested at most {MAX_DEPTH} levels deep")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)  # int subclasses (IntEnum) become plain ints
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else {"$float": repr(float(v))}
    if isinstance(v, torch.Tensor):
        key = path
        tensors[key] = v
        return {"$tensor": key}
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            raise UnsupportedStateError(path, "numpy object array")
        key = path
        tensors[key] = torch.from_numpy(np.ascontiguousarray(v))
        return {"$tensor": key, "numpy": True}
    if isinstance(v, np.generic):
        item = v.item()
        if isinstance(item, np.generic):  # longdouble, clongdouble: no Python type holds them exactly
            raise UnsupportedStateError(path, f"numpy.{type(v).__name__}", "convert it to a float or a tensor")
        return {"$np": v.dtype.str, "value": _enc(item, path, tensors, depth + 1)}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(v)).decode()}
    d = depth + 1
    if isinstance(v, tuple):
        return {"$tuple": [_enc(x, f"{path}[{i}]", tensors, d) for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_enc(x, f"{path}[{i}]", tensors, d) for i, x in enumerate(v)]
    if isinstance(v, (set, frozenset)):
        items = sorted(v, key=repr)  # sets have no order; sort for deterministic bytes
        return {"$set": [_enc(x, f"{path}{{}}", tensors, d) for x in items]}
    if isinstance(v, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in v):
            return {k: _enc(x, f"{path}.{k}", tensors, d) for k, x in v.items()}
        # Non-string keys (optimizer state is keyed by int) or keys that look like our tags.
        return {"$dict": [[_enc(k, f"{path}<key>", tensors, d), _enc(x, f"{path}.{k}", tensors, d)]
                          for k, x in v.items()]}
    raise UnsupportedStateError(path, f"{type(v).__module__}.{type(v).__qualname__}")


# The keys each tag's JSON object holds (what _enc writes); anything else beside a tag is refused.
_TAG_KEYS: dict[str, frozenset[str]] = {tag: frozenset({tag}) for tag in _TAGS}
_TAG_KEYS["$tensor"] = frozenset({"$tensor", "numpy"})
_TAG_KEYS["$np"] = frozenset({"$np", "value"})
_TORCH_DTYPE_NAMES: dict[str, torch.dtype] = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
_NP_SCALAR_KINDS = "biufUS"  # what np.generic.item() of a storable scalar gives back: bool, int, float, str, bytes


def decode(data: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """Inverse of :func:`encode`. ``data`` is untrusted: a malformed tag, a reference to a tensor the component
    lacks, a numpy scalar of an unknown type or out of its range, an unhashable key, or nesting deeper than
    :data:`MAX_DEPTH` raises :class:`ManifestError` for ``where``, naming the field (``state.0.weight.exp_avg``).

    Example:
        >>> decode({"$tuple": [1, {"$float": "inf"}]}, {}, "x")
        (1, inf)
        >>> decode({"$np": "<i1", "value": 300}, {}, "component 'v'")
        Traceback (most recent call last):
        ...
        ckptkit.errors.ManifestError: invalid manifest component 'v': (root): $np value 300 is out of the range of int8
    """
    return _Decoder(tensors, where).dec(data, "", 0)


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        self.tensors = tensors
        self.where = where

    def fail(self, path: str, problem: str) -> ManifestError:
        shown = path if len(path) <= 120 else f"{path[:58]}...{path[-58:]}"
        return ManifestError(self.where, f"{shown or '(root)'}: {problem}")

    def dec(self, d: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested deeper than {MAX_DEPTH} levels")
        if d is None or isinstance(d, (bool, int, float, str)):
            return d
        if isinstance(d, list):
            return [self.dec(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(d)]
        if not isinstance(d, dict):
            raise self.fail(path, f"unexpected JSON value of type {type(d).__name__}")
        tag = next((k for k in d if k in _TAGS), None)
        if tag is None:
            return {k: self.dec(x, f"{path}.{k}" if path else k, depth + 1) for k, x in d.items()}
        extra = sorted(set(d) - _TAG_KEYS[tag])
        if extra:
            raise self.fail(path, f"a {tag} value has unexpected keys {_short(extra)}")
        return self.tagged(tag, d[tag], d, path, depth + 1)

    def items(self, tag: str, body: Any, path: str) -> list[Any]:
        if not isinstance(body, list):
            raise self.fail(path, f"{tag} must hold a list, found {type(body).__name__}")
        return body

    def hashable(self, k: Any, path: str) -> Any:
        try:
            hash(k)
        except TypeError:
            raise self.fail(path, f"unhashable key or set element {_short(k)}") from None
        return k

    def tagged(self, tag: str, body: Any, d: dict[str, Any], path: str, depth: int) -> Any:
        if tag == "$tensor":
            t = self.tensors.get(body) if isinstance(body, str) else None
            if t is None:
                raise self.fail(path, f"$tensor {_short(body)} is not one of the component's tensors")
            numpy = d.get("numpy", False)
            if not isinstance(numpy, bool):
                raise self.fail(path, f"$tensor's 'numpy' must be true or false, found {_short(numpy)}")
            if not numpy:
                return t
            try:
                return t.numpy()
            except (TypeError, RuntimeError) as err:  # bfloat16 and other dtypes numpy lacks
                raise self.fail(path, f"tensor {body!r} of dtype {t.dtype} cannot be a numpy array ({err})") from err
        if tag == "$tuple":
            return tuple(self.dec(x, f"{path}[{i}]", depth) for i, x in enumerate(self.items(tag, body, path)))
        if tag == "$set":
            return {self.hashable(self.dec(x, f"{path}{{}}", depth), path) for x in self.items(tag, body, path)}
        if tag == "$dict":
            out: dict[Any, Any] = {}
            for i, pair in enumerate(self.items(tag, body, path)):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise self.fail(f"{path}[{i}]", f"a $dict entry must be a [key, value] pair, found {_short(pair)}")
                key = self.hashable(self.dec(pair[0], f"{path}<key {i}>", depth), f"{path}<key {i}>")
                out[key] = self.dec(pair[1], f"{path}.{key}" if path else str(key), depth)
            return out
        if tag == "$float":
            if body not in ("nan", "inf", "-inf"):
                raise self.fail(path, f"bad $float {_short(body)}: expected nan, inf or -inf")
            return float(body)
        if tag == "$bytes":
            if not isinstance(body, str):
                raise self.fail(path, f"$bytes must be a base64 string, found {type(body).__name__}")
            try:
                return base64.b64decode(body, validate=True)
            except ValueError as err:  # binascii.Error
                raise self.fail(path, f"$bytes is not valid base64 ({err})") from err
        if tag == "$dtype":
            dt = _TORCH_DTYPE_NAMES.get(body) if isinstance(body, str) else None
            if dt is None:
                raise self.fail(path, f"{_short(body)} is not a torch dtype")
            return dt
        assert tag == "$np"
        return self.np_scalar(body, d.get("value"), path, depth)

    def np_scalar(self, body: Any, raw: Any, path: str, depth: int) -> Any:
        try:
            dt = np.dtype(body) if isinstance(body, str) and len(body) <= 16 else None
        except (TypeError, ValueError):
            dt = None
        if dt is None or dt.kind not in _NP_SCALAR_KINDS or (dt.kind in "biuf" and dt.itemsize > 8) or dt.fields \
                is not None or dt.subdtype is not None:
            raise self.fail(path, f"$np {_short(body)} is not a numpy bool, integer, float, str or bytes type")
        value = self.dec(raw, path, depth)
        kind = dt.kind
        ok = (
            (kind == "b" and isinstance(value, bool))
            or (kind in "iu" and isinstance(value, int) and not isinstance(value, bool))
            or (kind == "f" and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (kind == "U" and isinstance(value, str))
            or (kind == "S" and isinstance(value, bytes))
        )
        if not ok:
            raise self.fail(path, f"$np value {_short(value)} does not fit numpy type {dt}")
        if kind == "U":
            return np.str_(value)
        if kind == "S":
            return np.bytes_(value)
        if kind in "iu":
            info = np.iinfo(dt)
            if not info.min <= value <= info.max:
                raise self.fail(path, f"$np value {_short(value)} is out of the range of {dt}")
        elif kind == "f":
            try:
                fits = not math.isfinite(value) or abs(float(value)) <= float(np.finfo(dt).max)
            except OverflowError:  # an integer too large for any float
                fits = False
            if not fits:
                raise self.fail(path, f"$np value {_short(value)} is out of the range of {dt}")
        return dt.type(value)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# --- objects (safetensors) ---------------------------------------------------------------------------------


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without copying when it is already contiguous on the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    array: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array).cast("B")


@dataclass
class PackedObject:
    """A safetensors object ready to store: its bytes as a list of buffers, and the hash of those bytes."""

    hash: str
    size: int
    buffers: list[memoryview]
    keys: list[str]

    def chunks(self) -> Iterator[memoryview]:
        yield from self.buffers


def pack(tensors: list[tuple[str, torch.Tensor]]) -> PackedObject:
    """Serialise tensors into one deterministic safetensors object (no copy of contiguous CPU tensors).

    Tensors are laid out by descending element size, then key, so every tensor is aligned for zero-copy
    loading; the header is canonical JSON padded to 8 bytes. The hash covers exactly the stored bytes.
    """
    items = sorted(tensors, key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {}
    datas: list[memoryview] = []
    offset = 0
    for key, t in items:
        data = _raw_bytes(t)
        span = [offset, offset + len(data)]
        header[key] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape), "data_offsets": span}
        datas.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    prefix = memoryview(struct.pack("<Q", len(head)) + head)
    buffers = [prefix, *datas]
    h = hasher(offset)
    for b in buffers:
        h.update(b)
    return PackedObject(str(h.hexdigest()), len(prefix) + offset, buffers, [k for k, _ in items])


def unpack(buf: bytearray | memoryview, where: str) -> dict[str, torch.Tensor]:
    """Parse a safetensors object held in ``buf`` into tensors that share its memory.

    ``buf`` must already be hash-verified; the header is still validated (offsets in range, sizes that
    match dtype and shape) since a hash only proves the bytes are the ones written, not that they are sane.
    """
    n = len(buf)
    if n < 8:
        raise CorruptObjectError(where, "a safetensors object", f"{n} bytes", "too short")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if hlen > n - 8:
        raise CorruptObjectError(where, f"header of {hlen} bytes", f"{n - 8} bytes after the length")
    try:
        header = json.loads(bytes(buf[8 : 8 + hlen]))
    except (ValueError, RecursionError) as err:  # ValueError: also too long an integer literal
        raise CorruptObjectError(where, "a JSON header", "unparseable bytes", str(err)) from err
    if not isinstance(header, dict):
        raise CorruptObjectError(where, "a JSON object header", type(header).__name__)
    base = 8 + hlen
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _TORCH_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:  # OverflowError: int(inf)
            raise CorruptObjectError(where, "a valid tensor entry", repr(info)[:100], f"key {key!r}") from err
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= start <= end <= n - base or end - start != numel * itemsize:
            raise CorruptObjectError(where, f"{numel * itemsize} bytes for {key!r}", f"offsets {start}..{end}")
        try:
            if numel == 0:
                out[key] = torch.empty(shape, dtype=dtype)
            elif (base + start) % itemsize == 0:
                out[key] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start).reshape(shape)
            else:  # foreign layout: copy to an aligned buffer
                raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - start, offset=base + start).clone()
                out[key] = raw.view(dtype).reshape(shape)
        except (RuntimeError, TypeError, ValueError, OverflowError) as err:  # e.g. shape [0, 2**70]
            raise CorruptObjectError(where, f"a valid shape for {key!r}", str(shape)[:100], str(err)[:200]) from err
    return out


# --- grouping tensors into objects ---------------------------------------------------------------------------

DEFAULT_OBJECT_SIZE = 64 << 20
"""Target size of one object: large enough that a checkpoint is not thousands of tiny objects on S3, small
enough that an unchanged module usually sits in an object of its own and is deduplicated."""


def group(entries: list[tuple[str, torch.Tensor]], target: int = DEFAULT_OBJECT_SIZE) -> list[list[str]]:
    """Partition tensor keys into objects of about ``target`` bytes along module boundaries.

    Keys are dotted module paths (``encoder.layer.3.attn.q.weight``). A subtree that fits in ``target`` stays
    together; a larger one is split along its children; neighbouring small pieces are merged in order. The
    result depends only on keys, dtypes and shapes (never on values), so the same model always yields the
    same grouping and an unchanged module the same object bytes.
    """
    sizes = {k: t.numel() * t.element_size() for k, t in entries}
    return [bin_ for bin_ in _split([k for k, _ in entries], sizes, 0, target) if bin_]


def _split(keys: list[str], sizes: dict[str, int], depth: int, target: int) -> list[list[str]]:
    if sum(sizes[k] for k in keys) <= target:
        return [keys]
    units: list[list[str]] = []
    children: dict[str, list[str]] = {}
    order: list[tuple[str, str | None]] = []  # (key, child) in first-seen order
    for k in keys:
        parts = k.split(".")
        child = parts[depth] if len(parts) > depth + 1 else None
        if child is None:
            order.append((k, None))
        elif child not in children:
            children[child] = [k]
            order.append((k, child))
        else:
            children[child].append(k)
    for k, child in order:
        units.extend([[k]] if child is None else _split(children[child], sizes, depth + 1, target))
    bins: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for unit in units:
        size = sum(sizes[k] for k in unit)
        if current and current_size + size > target:
            bins.append(current)
            current, current_size = [], 0
        current = current + unit
        current_size += size
    bins.append(current)
    return bins
