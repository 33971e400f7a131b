"""A sharded checkpoint as whole tensors: one component of the saved state dict gathered from every rank's shards
(in one process, no process group), and the model written as one safetensors file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from ckptkit.distributed.layout import ShardLocation, entry_paths, metadata_from_json, shards_name
from ckptkit.engine.manifests import RepoLike, latest_manifest, open_repository
from ckptkit.errors import (
    CorruptObjectError,
    DestinationNotEmptyError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ManifestError,
)
from ckptkit.format import dtype_code, unpack
from ckptkit.schema import Manifest

__all__ = ["StoredTensor", "consolidate", "full_state_dict", "stored_tensors"]

MODEL_FILE = "model.safetensors"
PROVENANCE = "ckptkit.json"
"""Written beside the consolidated file, as ``ckptkit.export`` does: which checkpoint it came from."""


@dataclass(frozen=True)
class StoredTensor:
    """How one whole tensor of a sharded checkpoint is stored: its dtype code, global shape, and chunks (offsets,
    object hash, key in the object). Two tensors with equal chunks are equal without reading them."""

    dtype: str
    shape: list[int]
    chunks: tuple[tuple[tuple[int, ...], str, str], ...]


def stored_tensors(manifest: Manifest, component: str = "model") -> dict[str, StoredTensor]:
    """The tensors of ``component`` of sharded checkpoint ``manifest`` (keyed as the unsharded module's
    ``state_dict()``) and where their chunks are stored; reads nothing but the manifest.

    Raises:
        ManifestError: not a sharded checkpoint, or a damaged one.

    Example::

        a, b = (stored_tensors(ckptkit.inspect(url, n)) for n in ("step-1", "step-2"))
        unchanged = [k for k in a if k in b and a[k] == b[k]]
    """
    md = metadata_from_json(manifest)
    paths = entry_paths(md, manifest.name)
    out: dict[str, StoredTensor] = {}
    for fqn, entry in md.state_dict_metadata.items():
        path = paths[fqn]
        if path[0] != component or len(path) < 2 or not isinstance(entry, TensorStorageMetadata):
            continue
        chunks = []
        for chunk in entry.chunks:
            loc = md.storage_data[MetadataIndex(fqn, chunk.offsets)]
            assert isinstance(loc, ShardLocation)  # metadata_from_json maps every chunk to one
            chunks.append((tuple(chunk.offsets), loc.object, loc.key))
        out[".".join(str(p) for p in path[1:])] = StoredTensor(dtype_code(entry.properties.dtype), list(entry.size),
                                                               tuple(sorted(chunks)))  # fmt: skip
    return out


def full_state_dict(repo: RepoLike, name: str | None = None, *, component: str = "model",
                    keys: Iterable[str] | None = None,
                    storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The whole tensors of ``component`` of sharded checkpoint ``name`` (the latest by default), keyed as the
    unsharded module's ``state_dict()`` (``"0.weight"``), gathered in this process from every rank's shards
    (each object read once, hash-verified). Non-tensor entries are left out; with ``keys``, only those tensors
    are read.

    Raises:
        InvalidArgumentError: the checkpoint has no tensors under ``component`` (the message lists its names).
        ManifestError: not a sharded checkpoint. CorruptObjectError, IncompleteCheckpointError: a damaged shard.

    Example::

        sd = ckptkit.distributed.full_state_dict(url, "step-00001000")
        torch.nn.Sequential(...).load_state_dict(sd)
    """
    r = open_repository(repo, storage_options)
    manifest = latest_manifest(r, name)
    md = metadata_from_json(manifest)  # validated: every chunk has a listed, typed shard
    paths = entry_paths(md, manifest.name)
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[tuple[torch.Tensor, ShardLocation, list[int]]]] = {}
    for fqn, entry in md.state_dict_metadata.items():
        path = paths[fqn]
        if path[0] != component or len(path) < 2 or not isinstance(entry, TensorStorageMetadata):
            continue
        key = ".".join(str(p) for p in path[1:])
        if wanted is not None and key not in wanted:
            continue
        full = torch.empty(entry.size, dtype=entry.properties.dtype)
        out[key] = full
        for chunk in entry.chunks:
            loc = md.storage_data[MetadataIndex(fqn, chunk.offsets)]
            assert isinstance(loc, ShardLocation)  # metadata_from_json maps every chunk to one
            view = full
            for dim, (off, length) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                view = view.narrow(dim, off, length)
            parts.setdefault(loc.object, []).append((view, loc, list(chunk.sizes)))
    if not out and not wanted:
        names = sorted({str(p[0]) for p in paths.values()})
        raise InvalidArgumentError(f"checkpoint {manifest.name!r} holds no tensors under {component!r} (its state "
                                   f"has {names}): pass one of those as component=")  # fmt: skip
    missing = []
    for h in sorted(parts):  # one object in memory at a time, beside the whole tensors
        try:
            tensors = unpack(r.read_object(h, manifest.objects[h].size), r.object_path(h))
        except FileNotFoundError:
            missing.append(r.object_path(h))
            continue
        for view, loc, sizes in parts[h]:
            src = tensors.get(loc.key)
            found = "nothing under that key" if src is None else f"{dtype_code(src.dtype)} {list(src.shape)}"
            if src is None or found != f"{loc.dtype} {sizes}":
                raise CorruptObjectError(r.object_path(h), f"tensor {loc.key!r} {loc.dtype} {sizes}", found,
                                         f"shard of {shards_name(loc.rank)}")  # fmt: skip
            view.copy_(src)
        del tensors
    if missing:
        raise IncompleteCheckpointError(manifest.name, missing)
    return out


def consolidate(repo: RepoLike, dest: str | os.PathLike[str], name: str | None = None, *, component: str = "model",
                storage_options: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """Write the model of sharded checkpoint ``name`` (the latest by default), saved by any number of ranks, into
    the folder ``dest`` as one ``model.safetensors`` of whole tensors keyed as the unsharded model's
    ``state_dict()`` (``safetensors.torch.load_file`` + ``load_state_dict`` loads it), with ``ckptkit.json``
    beside it (which checkpoint it came from, as ``ckptkit.export`` writes). Runs in one process. Returns the
    files written.

    Args:
        component: the name the model had in the saved state (default ``"model"``).

    Raises:
        DestinationNotEmptyError: ``dest`` holds files (nothing is written).
        InvalidArgumentError, ManifestError, CorruptObjectError, IncompleteCheckpointError: see
            :func:`full_state_dict`.

    Example::

        ckptkit.distributed.consolidate("s3://bucket/run-7", "export/", "step-00001000")
        model.load_state_dict(safetensors.torch.load_file("export/model.safetensors"))
    """
    dest = os.fspath(dest)
    if os.path.exists(dest) and os.listdir(dest):
        raise DestinationNotEmptyError(dest)
    r = open_repository(repo, storage_options)
    manifest = latest_manifest(r, name)
    tensors = full_state_dict(r, manifest.name, component=component)
    shared = {k for k, t in tensors.items() if t.untyped_storage().nbytes() != t.numel() * t.element_size()}
    if shared:  # gathered into fresh tensors: never happens, but safetensors refuses shared storage
        raise ManifestError(f"of checkpoint {manifest.name!r}", f"tensors {sorted(shared)[:5]} share storage")
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, MODEL_FILE)
    save_file(tensors, path, metadata={"format": "pt"})
    prov = os.path.join(dest, PROVENANCE)
    with open(prov, "w") as f:
        json.dump({"checkpoint": manifest.id, "name": manifest.name, "url": r.url, "component": component,
                   "adapter": None}, f, indent=2)  # fmt: skip
    return [path, prov]
