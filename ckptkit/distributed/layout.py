"""How a sharded checkpoint sits in a manifest: DCP's global ``Metadata`` as typed JSON, and back.

A checkpoint written through :class:`~ckptkit.distributed.RepositoryWriter` has these components:

* ``dcp``: DCP's metadata as typed JSON (``state``): every entry of the flattened state dict in DCP's order, a
  tensor as its dtype, global size and chunks (offsets, sizes, and the rank and key of the stored shard), a
  non-tensor value as typed JSON itself; the planner's data (the flattened key -> state-dict path mappings) and
  the storage meta. ``meta`` records ``world_size``.
* ``shards-<rank>`` (one per rank, five digits): the shards that rank wrote, as ordinary tensor references (object,
  key, dtype, shape), so ``ckptkit verify`` checks each shard like any other tensor.
* ``rng-<rank>`` (when RNG was saved): that rank's python, numpy and torch RNG state.

Nothing is pickled: :func:`metadata_from_json` rebuilds DCP's dataclasses from validated JSON, and refuses (with
:class:`~ckptkit.errors.ManifestError`) anything that does not fit: an unknown dtype, a chunk outside its tensor,
a shard no rank component lists, or one whose dtype or shape differs from its entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ckptkit.errors import ManifestError, UnsupportedStateError
from ckptkit.format import decode, dtype_code, encode
from ckptkit.schema import Manifest

__all__ = [
    "DCP",
    "ByteValue",
    "ShardLocation",
    "entry_paths",
    "metadata_from_json",
    "metadata_to_json",
    "rng_name",
    "shards_name",
    "world_size_of",
]

DCP = "dcp"
"""Name of the component that holds DCP's metadata as typed JSON."""


def shards_name(rank: int) -> str:
    """Name of the component listing the shards rank ``rank`` wrote.

    Example:
        >>> shards_name(3)
        'shards-00003'
    """
    return f"shards-{rank:05d}"


def rng_name(rank: int) -> str:
    """Name of the component holding rank ``rank``'s RNG state.

    Example:
        >>> rng_name(0)
        'rng-00000'
    """
    return f"rng-{rank:05d}"


@dataclass(frozen=True)
class ShardLocation:
    """Where one stored chunk of a tensor lives: the rank that wrote it, its key in the object, the object."""

    rank: int
    key: str
    object: str
    size: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ByteValue:
    """A non-tensor entry of the state dict, decoded from typed JSON."""

    value: Any


_DTYPES: dict[str, torch.dtype] = {}
for _dt in [v for v in vars(torch).values() if isinstance(v, torch.dtype)]:
    try:
        _DTYPES.setdefault(dtype_code(_dt), _dt)
    except UnsupportedStateError:
        continue


def metadata_to_json(md: Metadata, located: Mapping[MetadataIndex, tuple[int, str]],
                     values: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """DCP's metadata as typed JSON. ``located`` gives each written chunk's (rank, key), ``values`` each non-tensor
    entry's typed JSON.

    Raises:
        UnsupportedStateError: a dtype safetensors cannot store, or planner data that is not JSON-able.
        ManifestError: the metadata lists a chunk or value that no rank wrote.
    """
    entries: dict[str, Any] = {}
    for fqn, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            chunks = []
            for chunk in entry.chunks:
                where = located.get(MetadataIndex(fqn, chunk.offsets))
                if where is None:
                    raise ManifestError(f"of the sharded checkpoint, entry {fqn!r}", f"chunk at offsets "
                                        f"{list(chunk.offsets)} was planned but no rank reported writing it")
                chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "rank": where[0],
                               "key": where[1]})  # fmt: skip
            entries[fqn] = {"tensor": {"dtype": dtype_code(entry.properties.dtype), "size": list(entry.size),
                                       "chunks": chunks}}  # fmt: skip
        else:
            if fqn not in values:
                raise ManifestError(f"of the sharded checkpoint, entry {fqn!r}",
                                    "a non-tensor value was planned but no rank reported writing it")
            entries[fqn] = {"bytes": values[fqn]}
    sm = md.storage_meta
    storage_meta = None if sm is None else {
        "checkpoint_id": None if sm.checkpoint_id is None else str(sm.checkpoint_id),
        "save_id": sm.save_id, "modules": [str(m) for m in sm.modules],
    }  # fmt: skip
    return {"version": md.version, "entries": entries, "planner_data": encode(md.planner_data, "planner_data").json,
            "storage_meta": storage_meta}  # fmt: skip


def world_size_of(manifest: Manifest) -> int:
    """How many ranks wrote the sharded checkpoint ``manifest``.

    Raises:
        ManifestError: it is not a sharded checkpoint, or its world size is malformed.
    """
    comp = manifest.components.get(DCP)
    where = f"of checkpoint {manifest.name!r}"
    if comp is None:
        raise ManifestError(where, "it has no 'dcp' component: it was not saved by ckptkit.distributed.save; load it "
                                   "with ckptkit.restore")  # fmt: skip
    ws = comp.meta.get("world_size")
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise ManifestError(where, f"component 'dcp': meta.world_size must be a positive integer, found {ws!r}")
    return ws


def metadata_from_json(manifest: Manifest) -> Metadata:
    """Rebuild DCP's ``Metadata`` from a sharded checkpoint's manifest, validating every field; its
    ``storage_data`` maps each chunk's :class:`MetadataIndex` to a :class:`ShardLocation` and each non-tensor
    entry's to a :class:`ByteValue`.

    Raises:
        ManifestError: the manifest is not a sharded checkpoint, or a field does not fit (named in the message).
    """
    world = world_size_of(manifest)
    where = f"of checkpoint {manifest.name!r}, component 'dcp'"

    def fail(path: str, problem: str) -> ManifestError:
        return ManifestError(where, f"state.{path}: {problem}")

    state: Any = manifest.components[DCP].state
    if not isinstance(state, dict) or not isinstance(state.get("entries"), dict):
        raise fail("entries", "expected an object of entries")
    shards = {r: manifest.components[shards_name(r)].tensors for r in range(world)
              if shards_name(r) in manifest.components}  # fmt: skip
    sd_md: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, ShardLocation | ByteValue] = {}
    for fqn, entry in state["entries"].items():
        path = f"entries.{fqn}"
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in ("tensor", "bytes"):
            raise fail(path, "expected {\"tensor\": ...} or {\"bytes\": ...}")
        if "bytes" in entry:
            sd_md[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = ByteValue(decode(entry["bytes"], {}, f"{where}, {path}"))
            continue
        t = entry["tensor"]
        if not isinstance(t, dict) or set(t) != {"dtype", "size", "chunks"}:
            raise fail(path, "a tensor entry has exactly dtype, size and chunks")
        dtype = _DTYPES.get(t["dtype"]) if isinstance(t["dtype"], str) else None
        if dtype is None:
            raise fail(f"{path}.dtype", f"{t['dtype']!r} is not a dtype ckptkit stores")
        size = _ints(t["size"], None, fail, f"{path}.size")
        if not isinstance(t["chunks"], list):
            raise fail(f"{path}.chunks", "expected a list")
        chunks = []
        for i, c in enumerate(t["chunks"]):
            cpath = f"{path}.chunks[{i}]"
            if not isinstance(c, dict) or set(c) != {"offsets", "sizes", "rank", "key"}:
                raise fail(cpath, "a chunk has exactly offsets, sizes, rank and key")
            offsets = _ints(c["offsets"], len(size), fail, f"{cpath}.offsets")
            sizes = _ints(c["sizes"], len(size), fail, f"{cpath}.sizes")
            if any(o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)):
                raise fail(cpath, f"offsets {offsets} + sizes {sizes} fall outside the tensor's size {size}")
            rank, key = c["rank"], c["key"]
            if not isinstance(rank, int) or isinstance(rank, bool) or rank not in shards:
                raise fail(f"{cpath}.rank", f"{rank!r} names no shards component of the {world} rank(s)")
            ref = shards[rank].get(key) if isinstance(key, str) else None
            if ref is None:
                raise fail(f"{cpath}.key", f"{key!r} is not a shard of component {shards_name(rank)!r}")
            if ref.dtype != t["dtype"] or ref.shape != sizes or ref.object not in manifest.objects:
                raise fail(cpath, f"shard {key!r} of {shards_name(rank)!r} is {ref.dtype} {ref.shape} (object "
                                  f"{'listed' if ref.object in manifest.objects else 'not listed'}); the entry "
                                  f"says {t['dtype']} {sizes}")  # fmt: skip
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            storage[MetadataIndex(fqn, offsets)] = ShardLocation(rank, ref.key, ref.object,
                                                                 manifest.objects[ref.object].size, ref.dtype,
                                                                 tuple(ref.shape))  # fmt: skip
        sd_md[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), chunks)
    planner_data = decode(state.get("planner_data"), {}, f"{where}, state.planner_data")
    sm = state.get("storage_meta")
    storage_meta = None
    if sm is not None:
        ids_ok = isinstance(sm, dict) and all(isinstance(sm.get(k), (str, type(None))) for k in ("checkpoint_id",
                                                                                                 "save_id"))
        if not ids_ok or not isinstance(sm.get("modules", []), list):
            raise fail("storage_meta", "expected checkpoint_id, save_id (strings or null) and modules (a list)")
        storage_meta = StorageMeta(checkpoint_id=sm.get("checkpoint_id"), save_id=sm.get("save_id"),
                                   modules=[str(m) for m in sm.get("modules", [])])  # fmt: skip
    version = state.get("version")
    if version is not None and not isinstance(version, str):
        raise fail("version", f"expected a string, found {version!r}")
    return Metadata(state_dict_metadata=sd_md, planner_data=planner_data, storage_data=storage,
                    storage_meta=storage_meta, version=version)  # fmt: skip


def _ints(v: Any, n: int | None, fail: Any, path: str) -> list[int]:
    if not isinstance(v, list) or (n is not None and len(v) != n) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):  # fmt: skip
        want = f"{n} " if n is not None else ""
        raise fail(path, f"expected a list of {want}non-negative integers, found {str(v)[:80]}")
    return list(v)


def entry_paths(md: Metadata, name: str) -> dict[str, list[str | int]]:
    """Each entry's path in the saved state dict (DCP's planner data; the key itself when there is none), e.g.
    ``"model.0.weight" -> ["model", "0.weight"]``; ``name`` is the checkpoint's, for the message.

    Raises:
        ManifestError: a path is not a non-empty list of keys starting with a name.
    """
    mappings = md.planner_data if isinstance(md.planner_data, dict) else {}
    out: dict[str, list[str | int]] = {}
    for fqn in md.state_dict_metadata:
        path = mappings.get(fqn, (fqn,))
        if not isinstance(path, (tuple, list)) or not path or not isinstance(path[0], str) or not all(
                isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):  # fmt: skip
            raise ManifestError(f"of checkpoint {name!r}, component 'dcp'",
                                f"state.planner_data: the path of {fqn!r} is {str(path)[:80]}, not a list of keys")
        out[fqn] = list(path)
    return out
