"""ckptkit as the storage of ``torch.distributed.checkpoint``: a ``StorageWriter`` and a ``StorageReader`` over a
repository (any fsspec URL; one code path for local disk and S3).

Writing: each rank packs the shards DCP hands it into deterministic safetensors objects (one per module of the
state dict, so an unchanged shard, a frozen layer, gives the same bytes and is stored once), records their hashes
in the repository's ``pending/`` (protecting them from gc until the commit), writes the missing ones, and reports
where each shard went. Non-tensor entries (DCP would ``torch.save`` them) are stored as typed JSON, or refused.
The coordinator's ``finish()``, which DCP calls only after every rank reported success, writes the one manifest:
DCP's metadata as typed JSON, each rank's shards, the world size. A rank that dies before that leaves objects
(garbage for gc), never a committed checkpoint.

Reading: the manifest is validated and DCP's ``Metadata`` rebuilt from it (no unpickling); every object read is
hash-verified; DCP's planner reshards (a rank reads the parts of the stored chunks its own shards overlap).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import io
import os
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptkit.distributed.layout import (
    DCP,
    ByteValue,
    ShardLocation,
    metadata_from_json,
    metadata_to_json,
    shards_name,
    world_size_of,
)
from ckptkit.engine.commit import environment
from ckptkit.engine.manifests import RepoLike, latest_manifest, open_repository
from ckptkit.errors import (
    CheckpointExistsError,
    CorruptObjectError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ManifestError,
    StateMismatchError,
    UnsupportedStateError,
)
from ckptkit.format import DEFAULT_OBJECT_SIZE, PackedObject, dtype_code, encode, group, pack, unpack
from ckptkit.hashing import check_name, is_name
from ckptkit.schema import (
    Component,
    Dtype,
    Lineage,
    Manifest,
    ObjectInfo,
    Progress,
    TensorRef,
    build_manifest,
    dump_manifest,
)
from ckptkit.state import Captured
from ckptkit.storage import Repository

__all__ = ["RepositoryReader", "RepositoryWriter"]


def _done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def _name_of(checkpoint_id: str | os.PathLike[str] | None, current: str | None) -> str | None:
    if checkpoint_id is None:
        return current
    return check_name(os.fspath(checkpoint_id))


class RepositoryWriter(StorageWriter):
    """DCP ``StorageWriter`` that saves into a ckptkit repository as checkpoint ``name``.

    Use it with ``torch.distributed.checkpoint.save`` on every rank, then call :meth:`close` (it keeps this rank's
    pending record, which protects its objects from a concurrent gc, until the coordinator has committed);
    :func:`ckptkit.distributed.save` does all of that for you.

    Args:
        repo: repository URL (any fsspec URL), local path, or an open :class:`~ckptkit.storage.Repository`.
        name: the checkpoint name (or pass it as DCP's ``checkpoint_id``).
        progress, metrics, hparams, lineage: recorded in the manifest (the coordinator's are used).
        object_size: the most bytes of shards packed into one object (a module's shards share one).
        storage_options: fsspec options (credentials, endpoint) for a URL.

    Attributes:
        manifest: after the save, on the coordinator: the committed manifest (None elsewhere).
        written: how many objects this rank wrote (the others existed already: unchanged shards).

    Example::

        import torch.distributed.checkpoint as dcp
        writer = RepositoryWriter("s3://bucket/run-7", "step-00001000")
        try:
            dcp.save({"model": model_sd}, storage_writer=writer)
        finally:
            writer.close()
    """

    def __init__(
        self,
        repo: RepoLike,
        name: str | None = None,
        *,
        progress: Progress | None = None,
        metrics: Mapping[str, float] | None = None,
        hparams: Mapping[str, Any] | None = None,
        lineage: Lineage | None = None,
        object_size: int = DEFAULT_OBJECT_SIZE,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(object_size, bool) or not isinstance(object_size, int) or object_size <= 0:
            raise InvalidArgumentError(f"object_size={object_size!r}: must be a positive number of bytes per object")
        self.repo: Repository = open_repository(repo, storage_options)
        self.name = None if name is None else check_name(name)
        self.progress = progress or Progress()
        self.metrics = dict(metrics or {})
        self.hparams = dict(hparams or {})
        self.lineage = lineage or Lineage()
        self.object_size = object_size
        self.manifest: Manifest | None = None
        self.written = 0
        self.is_coordinator = False
        self.rank = 0
        self._extra: list[Captured] = []
        self._extra_objects: dict[str, PackedObject] = {}
        self._plans: list[Any] = []
        self._pending = contextlib.ExitStack()

    # --- ckptkit's additions -------------------------------------------------------------------------------

    def add_component(self, captured: Captured) -> None:
        """Store ``captured`` (e.g. this rank's RNG state) with this rank's shards, as its own component of the
        manifest. Call before the save, on the rank it belongs to."""
        self._extra.append(captured)

    def close(self) -> None:
        """Remove this rank's pending record. Call after ``dcp.save`` returned (or failed) on this rank."""
        self._pending.close()

    # --- StorageWriter -------------------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.close()
        self.name = _name_of(checkpoint_id, self.name)
        self.manifest, self.written, self._plans, self._extra_objects = None, 0, [], {}

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if self.name is None:
            raise InvalidArgumentError("RepositoryWriter: no checkpoint name: pass name= or checkpoint_id=")
        if is_coordinator and self.name in self.repo.list():
            raise CheckpointExistsError(self.repo.url, self.name)  # before any rank writes anything

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        components: dict[str, Any] = {}
        for c in self._extra:
            refs: dict[str, TensorRef] = {}
            for keys in group(list(c.tensors.items()), self.object_size):
                obj = pack([(k, c.tensors[k]) for k in keys])
                self._extra_objects[obj.hash] = obj
                for k in keys:
                    t = c.tensors[k]
                    refs[k] = TensorRef(object=obj.hash, key=k, dtype=cast(Dtype, dtype_code(t.dtype)),
                                        shape=list(t.shape))  # fmt: skip
            comp = Component(kind=c.kind, type=c.type, tensors=refs, aliases=c.aliases, state=c.json, meta=c.meta)
            components[c.name] = comp.model_dump(mode="json")
        extras = {"components": components, "objects": {h: o.size for h, o in self._extra_objects.items()}}
        return dataclasses.replace(plan, storage_data=extras)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._plans = [p.storage_data for p in plans]
        return [dataclasses.replace(p, storage_data=i) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank = plan.storage_data if isinstance(plan.storage_data, int) else self.rank
        results: list[WriteResult] = []
        by_module: dict[str, list[tuple[str, WriteItem, torch.Tensor]]] = {}
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                results.append(self._value(item, planner))
                continue
            tensor = cast(torch.Tensor, planner.resolve_data(item)).detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            offsets = item.tensor_data.chunk.offsets if item.tensor_data is not None else ()
            key = f"{fqn}@{','.join(str(o) for o in offsets)}"
            by_module.setdefault(fqn.rsplit(".", 1)[0], []).append((key, item, tensor))
        packed: dict[str, PackedObject] = dict(self._extra_objects)
        for entries in by_module.values():
            tensors = {k: t for k, _, t in entries}
            items = {k: it for k, it, _ in entries}
            for keys in group([(k, t) for k, _, t in entries], self.object_size):
                obj = pack([(k, tensors[k]) for k in keys])
                packed[obj.hash] = obj
                for k in keys:
                    results.append(WriteResult(index=items[k].index, size_in_bytes=tensors[k].numel() *
                                               tensors[k].element_size(),
                                               storage_data={"rank": rank, "key": k, "object": obj.hash,
                                                             "size": obj.size}))  # fmt: skip
        self._pending.enter_context(self.repo.pending(packed))  # held until close(): after the commit
        missing = self.repo.missing_objects(packed)
        self.repo.write_objects([(h, packed[h].chunks()) for h in missing])
        self.written = len(missing)
        return _done(results)

    def _value(self, item: WriteItem, planner: SavePlanner) -> WriteResult:
        fqn = item.index.fqn
        lookup = getattr(planner, "lookup_object", None)
        if lookup is None:
            raise UnsupportedStateError(f"DCP entry {fqn!r}", "a non-tensor value behind a custom planner",
                                        "ckptkit stores non-tensor values as typed JSON, never as DCP's torch.save "
                                        "bytes: use a planner derived from DefaultSavePlanner (it has lookup_object)")
        value = lookup(item.index)
        enc = encode(value, f"DCP entry {fqn!r}")
        if enc.tensors:
            raise UnsupportedStateError(f"DCP entry {fqn!r}", "a non-tensor value holding tensors (e.g. a tuple of "
                                        "tensors)", "make each tensor its own entry of the state dict (a dict or a "
                                        "list of tensors), which DCP then shards and ckptkit stores as objects")
        return WriteResult(index=item.index, size_in_bytes=0, storage_data={"value": enc.json})

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.name is not None  # set_up_storage_writer refused a save without a name
        world = len(results)
        located: dict[MetadataIndex, tuple[int, str]] = {}
        values: dict[str, Any] = {}
        shards: dict[int, dict[str, TensorRef]] = {r: {} for r in range(world)}
        objects: dict[str, ObjectInfo] = {}
        dtypes = {fqn: e.properties.dtype for fqn, e in metadata.state_dict_metadata.items()
                  if hasattr(e, "properties")}  # fmt: skip
        for rank_results in results:
            for res in rank_results:
                sd = res.storage_data
                if "value" in sd:
                    values[res.index.fqn] = sd["value"]
                    continue
                rank, key = sd["rank"], sd["key"]
                entry = metadata.state_dict_metadata.get(res.index.fqn)
                chunk = next((c for c in getattr(entry, "chunks", []) if c.offsets == res.index.offset), None)
                if chunk is None:
                    raise ManifestError(f"for {self.name!r}", f"rank {rank} wrote a shard of {res.index.fqn!r} at "
                                        f"offsets {list(res.index.offset or [])} that DCP's metadata does not list")
                located[MetadataIndex(res.index.fqn, res.index.offset)] = (rank, key)
                shards[rank][key] = TensorRef(object=sd["object"], key=key,
                                              dtype=cast(Dtype, dtype_code(dtypes[res.index.fqn])),
                                              shape=list(chunk.sizes))  # fmt: skip
                objects[sd["object"]] = ObjectInfo(size=sd["size"])
        components: dict[str, Component] = {
            DCP: Component(kind="stateful", type="torch.distributed.checkpoint.Metadata",
                           state=metadata_to_json(metadata, located, values),
                           meta={"world_size": world, "layout": "ckptkit.distributed/1"}),
        }
        for r in range(world):
            components[shards_name(r)] = Component(kind="stateful", type="ckptkit.distributed.Shards",
                                                   tensors=shards[r], meta={"rank": r})  # fmt: skip
        for extras in self._plans:
            if isinstance(extras, dict):
                for cname, comp in extras.get("components", {}).items():
                    components[cname] = Component.model_validate(comp)
                objects.update({h: ObjectInfo(size=s) for h, s in extras.get("objects", {}).items()})
        manifest = build_manifest(
            name=self.name, created_at=_dt.datetime.now(_dt.timezone.utc), environment=environment(),
            progress=self.progress, components=components, objects=objects, hparams=self.hparams,
            metrics=self.metrics, lineage=self.lineage,
        )  # fmt: skip
        self.repo.commit(self.name, dump_manifest(manifest))  # the commit: every rank's objects are stored
        self.manifest = manifest

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_name(os.fspath(checkpoint_id))


class RepositoryReader(StorageReader):
    """DCP ``StorageReader`` that loads checkpoint ``name`` (the latest when ``None``) from a ckptkit repository,
    resharding as DCP does: any number of ranks can read a checkpoint written by any other number.

    Every object read is hash-verified (:class:`~ckptkit.errors.CorruptObjectError` otherwise); a missing one
    raises :class:`~ckptkit.errors.IncompleteCheckpointError`. Use it with ``torch.distributed.checkpoint.load``;
    :func:`ckptkit.distributed.load` does that for models and optimizers and restores RNG.

    Example::

        import torch.distributed.checkpoint as dcp
        dcp.load({"model": model_sd}, storage_reader=RepositoryReader("s3://bucket/run-7", "step-00001000"))
    """

    def __init__(self, repo: RepoLike, name: str | None = None, *,
                 storage_options: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.repo: Repository = open_repository(repo, storage_options)
        self.name = None if name is None else check_name(name)
        self.manifest: Manifest | None = None
        self._storage: dict[MetadataIndex, ShardLocation | ByteValue] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.name = _name_of(checkpoint_id, self.name)
        self.manifest, self._storage = None, {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        manifest = latest_manifest(self.repo, self.name)
        md = metadata_from_json(manifest)
        self.manifest, self.name = manifest, manifest.name
        self._storage = md.storage_data
        return md

    @property
    def world_size(self) -> int:
        """How many ranks wrote the checkpoint (after :meth:`read_metadata`)."""
        if self.manifest is None:
            self.read_metadata()
        assert self.manifest is not None
        return world_size_of(self.manifest)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._storage and isinstance(metadata.storage_data, dict):
            self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        tensor_items: dict[str, list[tuple[ReadItem, ShardLocation]]] = {}
        for item in plan.items:
            loc = self._storage.get(item.storage_index)
            if item.type == LoadItemType.BYTE_IO:
                if not isinstance(loc, ByteValue):
                    raise StateMismatchError(item.storage_index.fqn, "the checkpoint holds no value under this key")
                buf = io.BytesIO()
                torch.save(loc.value, buf)  # DCP's planner takes bytes; these are made here from validated JSON
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            if not isinstance(loc, ShardLocation):
                raise StateMismatchError(item.storage_index.fqn, f"no stored chunk at offsets "
                                         f"{list(item.storage_index.offset or [])}")  # fmt: skip
            tensor_items.setdefault(loc.object, []).append((item, loc))
        hashes = sorted(tensor_items)

        def fetch(h: str) -> dict[str, torch.Tensor] | None:
            size = tensor_items[h][0][1].size
            try:
                return unpack(self.repo.read_object(h, size), self.repo.object_path(h))
            except FileNotFoundError:
                return None

        workers = min(len(hashes), 2 if self.repo.local else 8) or 1
        missing = []
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckptkit-dcp-read") as pool:
            for h, tensors in zip(hashes, pool.map(fetch, hashes), strict=True):
                if tensors is None:
                    missing.append(self.repo.object_path(h))
                    continue
                for item, loc in tensor_items[h]:
                    self._copy(item, loc, tensors, h, planner)
        if missing:
            raise IncompleteCheckpointError(self.name or "?", missing)
        return _done(None)

    def _copy(self, item: ReadItem, loc: ShardLocation, tensors: dict[str, torch.Tensor], h: str,
              planner: LoadPlanner) -> None:  # fmt: skip
        src = tensors.get(loc.key)
        found = "nothing under that key" if src is None else f"{dtype_code(src.dtype)} {list(src.shape)}"
        if src is None or found != f"{loc.dtype} {list(loc.shape)}":
            raise CorruptObjectError(self.repo.object_path(h), f"tensor {loc.key!r} {loc.dtype} {list(loc.shape)}",
                                     found, f"shard of {shards_name(loc.rank)}")  # fmt: skip
        for dim, (off, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
            src = src.narrow(dim, off, length)
        target = planner.resolve_tensor(item).detach()
        if list(target.shape) != list(src.shape):
            raise StateMismatchError(item.dest_index.fqn, f"stored part {list(src.shape)}, target "
                                     f"{list(target.shape)}")  # fmt: skip
        target.copy_(src)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_name(os.fspath(checkpoint_id))
