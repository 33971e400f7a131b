"""Lossless codecs for stored objects: a small registry (name -> encode, decode) and ``byteplane-zstd``.

A codec changes how an object is *stored*, never what it *is*: the object's name is still the blake3 of its
uncompressed safetensors bytes, so a compressed and a raw repository share object identities and deduplicate
alike, and reading an object decodes it and checks that hash. An encoded object is a container that says its own
form in its first bytes (:data:`MAGIC`, which no safetensors object can begin with: read as a header length it
exceeds any object), then the codec's name, then the codec's payload. Readers rely on those bytes, never on the
manifest, so an object keeps loading after a copy into a repository configured otherwise.

``byteplane-zstd`` splits each run of same-sized elements (the tensors of one element size, which ckptkit lays out
together) into byte planes -- byte ``j`` of every element in plane ``j`` (bf16/fp16: 2 planes, fp32: 4, fp64 and
int64: 8; 1-byte dtypes and the safetensors header: one plane) -- in chunks of :data:`CHUNK` bytes, and compresses
each plane of each chunk as one zstd frame at level 1 (:data:`ZSTD_PARAMS`). A plane that does not shrink (the low
mantissa bytes of trained weights are nearly random) is stored as it is; an object that does not shrink by
:data:`MIN_SAVING` as a whole is stored raw. Decoding is bounded: the declared sizes are checked against the
object's size from the manifest (before anything of that size is allocated) and against the element sizes its
safetensors header gives, and each frame must declare exactly the bytes its plane needs.

Importing this module registers the decoder with the storage layer
(:func:`ckptkit.storage.repository.register_decoder`); :mod:`ckptkit.format` imports it.

Example:
    >>> import numpy as np
    >>> from ckptkit.format import pack
    >>> import torch
    >>> obj = pack([("w", torch.zeros(4096, dtype=torch.bfloat16))])
    >>> stored = encode("byteplane-zstd", obj.buffers, obj.size)
    >>> stored is not None and sum(len(b) for b in stored) < obj.size
    True
    >>> bytes(decode(b"".join(stored), obj.size, "example")) == b"".join(obj.buffers)
    True
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptkit.errors import CorruptObjectError, InvalidArgumentError, MissingDependencyError
from ckptkit.storage.repository import register_decoder

__all__ = [
    "CHUNK",
    "CODEC_NAME_RE",
    "MAGIC",
    "MIN_SAVING",
    "ZSTD_LEVEL",
    "ZSTD_PARAMS",
    "Codec",
    "check_codec",
    "codec_names",
    "decode",
    "encode",
    "register_codec",
    "stored_codec",
]

MAGIC = b"\x89CKC\r\n\x1a\n"
"""First bytes of every encoded object. As a little-endian safetensors header length it reads ~7.2e17, larger than
any object, so a raw safetensors object never starts with it."""
CODEC_NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,63}$"
"""What a codec's name may be (it is recorded in manifests and in the repository's config)."""
MIN_SAVING = 0.02
"""An object whose encoded form is not at least this fraction smaller is stored raw."""
CHUNK = 16 << 20
"""Bytes of one run of same-sized elements per chunk; each plane of a chunk is one zstd frame (frames of
different chunks compress and decompress in parallel)."""
ZSTD_LEVEL = 1
ZSTD_PARAMS = {"min_match": 7, "hash_log": 6}
"""Level 1 with its match finder cut to the minimum: a byte plane is a stream of literals that zstd's Huffman stage
compresses, and matches cost time and ratio there (bench/compress.py, docs/benchmarks.md: on trained bf16/fp32
planes ratio 2.09 against 2.01, compression 3.6x and decompression 2.9x faster than plain level 1)."""
_SAMPLE = 128 << 10  # a plane whose first bytes do not shrink is stored as it is, without compressing the rest
_NAME = re.compile(CODEC_NAME_RE[1:-1])

Encoder = Callable[[Sequence[memoryview], int], "list[memoryview] | None"]
Decoder = Callable[[memoryview, int, str], memoryview]


@dataclass(frozen=True)
class Codec:
    """A registered codec: ``encode(buffers, size)`` gives the payload's chunks, or None when encoding does not
    pay; ``decode(payload, size, where)`` gives back exactly ``size`` bytes, or raises
    :class:`~ckptkit.errors.CorruptObjectError` naming ``where``."""

    name: str
    encode: Encoder
    decode: Decoder


_CODECS: dict[str, Codec] = {}


def register_codec(name: str, encode: Encoder, decode: Decoder) -> None:
    """Add a codec under ``name`` (replacing one of that name).

    Example:
        >>> register_codec("identity-example", lambda bufs, size: [memoryview(b"".join(bufs))],
        ...                lambda payload, size, where: memoryview(bytearray(payload)))
        >>> "identity-example" in codec_names()
        True
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(f"codec name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-'")
    _CODECS[name] = Codec(name, encode, decode)


def codec_names() -> list[str]:
    """The registered codecs' names, sorted.

    Example:
        >>> "byteplane-zstd" in codec_names()
        True
    """
    return sorted(_CODECS)


def check_codec(name: object, where: str = "codec") -> str:
    """``name`` if it is a registered codec; else :class:`~ckptkit.errors.InvalidArgumentError` listing them.

    Example:
        >>> check_codec("byteplane-zstd")
        'byteplane-zstd'
    """
    if not isinstance(name, str) or name not in _CODECS:
        raise InvalidArgumentError(f"{where}={name!r} is not a known codec: use one of {codec_names()} (or None "
                                   "for raw objects), or register it with ckptkit.codecs.register_codec")
    return name


def encode(name: str, buffers: Sequence[memoryview], size: int) -> list[memoryview] | None:
    """The stored form of the object whose bytes are ``buffers`` (``size`` bytes in all) under codec ``name``, or
    None when it would not be at least :data:`MIN_SAVING` smaller (then the object is stored raw). ``buffers`` are
    only read: the caller's tensors are never modified."""
    codec = _CODECS[check_codec(name)]
    payload = codec.encode(buffers, size)
    if payload is None:
        return None
    head = memoryview(MAGIC + bytes([len(name)]) + name.encode())
    stored = len(head) + sum(len(p) for p in payload)
    if stored > size * (1 - MIN_SAVING):
        return None
    return [head, *payload]


def stored_codec(prefix: bytes | memoryview) -> str | None:
    """The codec named by an object's first bytes (at least 73 of them), or None for a raw object (or a name that
    is not a codec's).

    Example:
        >>> stored_codec(MAGIC + bytes([14]) + b"byteplane-zstd")
        'byteplane-zstd'
        >>> stored_codec(b"\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}      ") is None
        True
    """
    prefix = bytes(prefix)
    if not prefix.startswith(MAGIC) or len(prefix) <= len(MAGIC):
        return None
    n = prefix[len(MAGIC)]
    name = prefix[len(MAGIC) + 1 : len(MAGIC) + 1 + n].decode("ascii", "replace")
    return name if _NAME.fullmatch(name) else None


def decode(buf: bytes | bytearray | memoryview, size: int | None, where: str) -> memoryview:
    """The object bytes that the encoded ``buf`` stores: exactly ``size`` bytes (the manifest's size of the object;
    None: what the container declares, unbounded), in a new writable buffer. The caller checks their hash.

    Raises:
        CorruptObjectError: ``buf`` is not a container of a registered codec, is truncated, declares other sizes
            than the object has, or its compressed data is damaged; it names ``where``.
    """
    view = memoryview(buf).cast("B")
    n0 = len(MAGIC)
    if bytes(view[:n0]) != MAGIC or len(view) < n0 + 1:
        raise CorruptObjectError(where, "an encoded object", f"{len(view)} bytes without ckptkit's codec header")
    n = view[n0]
    name = bytes(view[n0 + 1 : n0 + 1 + n]).decode("ascii", "replace")
    codec = _CODECS.get(name)
    if codec is None:
        raise CorruptObjectError(where, f"an object encoded by one of {codec_names()}", f"codec {name!r}",
                                 "a ckptkit that knows this codec can read it: upgrade ckptkit")  # fmt: skip
    return codec.decode(view[n0 + 1 + n :], -1 if size is None else size, where)


# --- byteplane-zstd -----------------------------------------------------------------------------------------

# safetensors dtype code -> element size: what decides the byte planes (kept here: this module imports no torch)
_ELEMENT_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                 "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}  # fmt: skip
_PAYLOAD_HEAD = struct.Struct("<QQII")  # object size, chunk size, number of segments, number of frames
_SEGMENT = struct.Struct("<BQ")  # element size, bytes
_FRAME = struct.Struct("<BQ")  # kind (0: stored as it is, 1: zstd), stored bytes
_RAW, _ZSTD = 0, 1


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as err:
        raise MissingDependencyError("codec 'byteplane-zstd' needs zstandard: pip install 'ckptkit[compress]'") \
            from err  # fmt: skip
    return zstandard


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for the frames of one object (zstd and numpy's copies release the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(min(os.cpu_count() or 1, 8), thread_name_prefix="ckptkit-codec")


def _segments(header: bytes | memoryview, size: int, where: str) -> list[tuple[int, int]]:
    """The runs (element size, bytes) of an object of ``size`` bytes, from its safetensors header (``header``
    holds at least its first 8 + header-length bytes): the header itself as one 1-byte run, then the tensors'
    data in offset order, neighbours of one element size merged. Bytes not covered by a tensor are 1-byte runs."""
    if len(header) < 8:
        raise CorruptObjectError(where, "a safetensors header", f"{len(header)} bytes")
    (hlen,) = struct.unpack_from("<Q", header, 0)
    if hlen > min(size, len(header)) - 8:
        raise CorruptObjectError(where, f"a header of at most {size - 8} bytes", f"header length {hlen}")
    try:
        info = json.loads(bytes(header[8 : 8 + hlen]))
        spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), _ELEMENT_SIZE[v["dtype"]])
                       for k, v in info.items() if k != "__metadata__")  # fmt: skip
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError, IndexError, OverflowError) as err:
        raise CorruptObjectError(where, "a safetensors header", "an unparseable one", str(err)[:200]) from err
    base = 8 + hlen
    runs: list[tuple[int, int]] = [(1, base)]
    at = 0
    for start, end, es in spans:
        if start < at or end < start or base + end > size or (end - start) % es:
            raise CorruptObjectError(where, "tensors laid out within the object", f"offsets {start}..{end}")
        if start > at:
            runs.append((1, start - at))
        if end > start:
            runs.append((es, end - start))
        at = end
    if base + at < size:
        runs.append((1, size - base - at))
    merged: list[tuple[int, int]] = []
    for es, nbytes in runs:
        if merged and merged[-1][0] == es:
            merged[-1] = (es, merged[-1][1] + nbytes)
        else:
            merged.append((es, nbytes))
    return merged


def _frames(segments: list[tuple[int, int]], chunk: int) -> list[tuple[int, int, int]]:
    """(offset in the object, element size, chunk bytes) of each chunk, in order; each has ``es`` planes."""
    out = []
    at = 0
    for es, nbytes in segments:
        step = max(chunk - chunk % es, es)
        for off in range(0, nbytes, step):
            out.append((at + off, es, min(step, nbytes - off)))
        at += nbytes
    return out


def _bp_encode(buffers: Sequence[memoryview], size: int) -> list[memoryview] | None:
    zstd = _zstd()
    views = [memoryview(b).cast("B") for b in buffers]
    head = views[0] if views else memoryview(b"")
    try:
        segments = _segments(head, size, "the object being written")
    except CorruptObjectError:
        return None  # not a safetensors object ckptkit wrote: store it as it is
    # One read-only numpy view over each buffer; never written to (the caller's tensors stay as they are).
    arrays = [np.frombuffer(v, dtype=np.uint8) for v in views if len(v)]
    starts = np.cumsum([0, *[len(a) for a in arrays]])
    chunks = _frames(segments, CHUNK)

    def gather(off: int, n: int) -> np.ndarray:
        i = int(np.searchsorted(starts, off, side="right")) - 1
        parts, need = [], n
        while need:
            a = arrays[i]
            lo = off - int(starts[i])
            take = min(len(a) - lo, need)
            parts.append(a[lo : lo + take])
            off, need, i = off + take, need - take, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    compressor = threading.local()

    def one(spec: tuple[int, int, int]) -> list[tuple[int, bytes | memoryview]]:
        off, es, n = spec
        data = gather(off, n)
        planes = [data] if es == 1 else list(data.reshape(-1, es).T.copy())
        c = getattr(compressor, "c", None)
        if c is None:
            c = compressor.c = zstd.ZstdCompressor(compression_params=zstd.ZstdCompressionParameters.from_level(
                ZSTD_LEVEL, write_content_size=True, **ZSTD_PARAMS))
        out: list[tuple[int, bytes | memoryview]] = []
        for p in planes:
            pv = np.ascontiguousarray(p).data.cast("B")
            if len(pv) > 2 * _SAMPLE and len(c.compress(pv[:_SAMPLE])) > _SAMPLE * (1 - MIN_SAVING):
                out.append((_RAW, pv))
                continue
            z = c.compress(pv)
            out.append((_ZSTD, z) if len(z) < len(pv) else (_RAW, pv))
        return out

    results = list(_pool().map(one, chunks)) if len(chunks) > 1 else [one(c) for c in chunks]
    frames = [f for r in results for f in r]
    table = bytearray(_PAYLOAD_HEAD.pack(size, CHUNK, len(segments), len(frames)))
    for es, nbytes in segments:
        table += _SEGMENT.pack(es, nbytes)
    for kind, data in frames:
        table += _FRAME.pack(kind, len(data))
    return [memoryview(table), *(memoryview(d).cast("B") for _, d in frames)]


def _bp_decode(payload: memoryview, size: int, where: str) -> memoryview:
    """Decode within bounds: every size is checked before memory of that size is taken, and no frame may give
    more than its plane's bytes."""
    zstd = _zstd()
    if len(payload) < _PAYLOAD_HEAD.size:
        raise CorruptObjectError(where, "a byteplane-zstd table", f"{len(payload)} bytes", "truncated")
    total, chunk, nseg, nframes = _PAYLOAD_HEAD.unpack_from(payload, 0)
    if size >= 0 and total != size:
        raise CorruptObjectError(where, f"{size} bytes (the manifest's size of the object)",
                                 f"a container declaring {total} bytes")  # fmt: skip
    table_end = _PAYLOAD_HEAD.size + nseg * _SEGMENT.size + nframes * _FRAME.size
    if table_end > len(payload) or chunk < 8:
        raise CorruptObjectError(where, f"a table of {table_end} bytes and a chunk size >= 8",
                                 f"{len(payload)} bytes, chunk {chunk}", "truncated or damaged")  # fmt: skip
    segments = [_SEGMENT.unpack_from(payload, _PAYLOAD_HEAD.size + i * _SEGMENT.size) for i in range(nseg)]
    at = _PAYLOAD_HEAD.size + nseg * _SEGMENT.size
    frames = [_FRAME.unpack_from(payload, at + i * _FRAME.size) for i in range(nframes)]
    if sum(n for _, n in segments) != total or any(es not in (1, 2, 4, 8) or n % es for es, n in segments):
        raise CorruptObjectError(where, f"segments adding up to {total} bytes", repr(segments[:8])[:200])
    chunks = _frames(segments, chunk)
    planes = [(off, es, n, j) for off, es, n in chunks for j in range(es)]
    if len(planes) != nframes or any(k not in (_RAW, _ZSTD) for k, _ in frames):
        raise CorruptObjectError(where, f"{len(planes)} frames", f"{nframes}", "the frame table is damaged")
    offsets = np.cumsum([table_end, *[s for _, s in frames]]).tolist()
    if offsets[-1] != len(payload):
        raise CorruptObjectError(where, f"{offsets[-1]} bytes of frames", f"{len(payload)}", "truncated or padded")
    local = threading.local()  # a zstd (de)compressor is not thread-safe: one per thread

    def plane(i: int) -> memoryview:
        _, es, n, _ = planes[i]
        kind, stored = frames[i]
        data = payload[offsets[i] : offsets[i] + stored]
        want = n // es
        if kind == _RAW:
            if stored != want:
                raise CorruptObjectError(where, f"a stored plane of {want} bytes", f"{stored} bytes")
            return data
        try:
            declared = zstd.get_frame_parameters(data).content_size
        except zstd.ZstdError as err:
            raise CorruptObjectError(where, "a zstd frame", "damaged bytes", f"frame {i}: {err}") from err
        if declared != want:  # also a frame without its size (zstd's "unknown" is 2**64 - 1)
            raise CorruptObjectError(where, f"a zstd frame of {want} bytes", f"one declaring {declared}",
                                     f"frame {i}")  # fmt: skip
        d = getattr(local, "d", None)
        if d is None:
            d = local.d = zstd.ZstdDecompressor()
        try:
            out = d.decompress(data, max_output_size=want, allow_extra_data=False)
        except zstd.ZstdError as err:
            raise CorruptObjectError(where, f"a zstd frame of {want} bytes", "damaged data",
                                     f"frame {i}: {err}") from err  # fmt: skip
        if len(out) != want:
            raise CorruptObjectError(where, f"{want} bytes from frame {i}", f"{len(out)} bytes")
        return memoryview(out)

    # The size is the manifest's (checked above): only that much is allocated. The header's planes come first: the
    # element sizes of the runs must be those its tensors' dtypes give before any other frame is decoded.
    out = np.empty(total, dtype=np.uint8)
    first = [i for i, p in enumerate(planes) if p[0] < segments[0][1]] if segments else []
    for i in first:
        out[planes[i][0] : planes[i][0] + planes[i][2]] = np.frombuffer(plane(i), dtype=np.uint8)
    if _segments(out.data[: segments[0][1] if segments else 0], total, where) != [tuple(s) for s in segments]:
        raise CorruptObjectError(where, "byte planes by the element sizes of the header's dtypes",
                                 repr(segments[:8])[:200])  # fmt: skip

    def place(i: int) -> None:
        off, es, n, j = planes[i]
        src = np.frombuffer(plane(i), dtype=np.uint8)
        out[off + j : off + n : es] = src

    rest = range(len(first), len(planes))
    if len(rest) > 2 and total > CHUNK:
        list(_pool().map(place, rest))
    else:
        for i in rest:
            place(i)
    return out.data.cast("B")


register_codec("byteplane-zstd", _bp_encode, _bp_decode)
register_decoder(MAGIC, decode)
