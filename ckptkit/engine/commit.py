"""Commit: pack captured components into content-addressed objects, store the missing ones, write the
manifest last. Internal engine (used by the facade, the manager and the importers)."""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as _dt
import functools
import os
import platform
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch

from ckptkit import codecs
from ckptkit.format import DEFAULT_OBJECT_SIZE, PackedObject, dtype_code, group, pack
from ckptkit.schema import (
    Component,
    DataSegment,
    Dtype,
    Environment,
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
from ckptkit.version import __version__

__all__ = ["ENCODE_BATCH", "commit_captured", "environment"]

ENCODE_BATCH = 512 << 20
"""Bytes of objects encoded (in parallel) ahead of the writing, when the repository stores them compressed: what
an encoded save holds in memory beyond the state itself (and, on S3, the parts in flight)."""


@functools.cache
def environment() -> Environment:
    rev = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        if out.returncode == 0:
            rev = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None  # no git here: the revision is optional
    return Environment(
        ckptkit=__version__, torch=torch.__version__, python=platform.python_version(),
        platform=f"{sys.platform}-{platform.machine()}", host=socket.gethostname(),
        code_revision=os.environ.get("CKPTKIT_CODE_REVISION", rev),
    )  # fmt: skip



def commit_captured(
    r: Repository,
    captured: list[Captured],
    name: str,
    *,
    progress: Progress | None = None,
    metrics: Mapping[str, float] | None = None,
    hparams: Mapping[str, Any] | None = None,
    data: list[DataSegment] | None = None,
    lineage: Lineage | None = None,
    object_size: int = DEFAULT_OBJECT_SIZE,
    codec: str | None = None,
) -> Manifest:
    """Pack captured components into objects, store the missing ones, and commit the manifest.

    ``codec`` (default: the repository's, :attr:`Repository.codec`; None there: raw) encodes the objects this save
    writes (their names stay the hash of their raw bytes); the manifest records each object's stored form.
    """
    where = "codec"
    if codec is None:
        codec, where = r.codec, f"codec (in {r.url}/repository.json)"
    if codec is not None:
        codecs.check_codec(codec, where)
    packed = {}
    refs: dict[str, dict[str, TensorRef]] = {}
    for comp in captured:
        refs[comp.name] = {}
        by_class: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for key, t in comp.tensors.items():
            by_class.setdefault(comp.classes.get(key, "state"), []).append((key, t))
        for entries in by_class.values():
            tensors = dict(entries)
            for keys in group(entries, object_size):
                obj = pack([(k, tensors[k]) for k in keys])
                packed[obj.hash] = obj
                for k in keys:
                    t = tensors[k]
                    refs[comp.name][k] = TensorRef(object=obj.hash, key=k, dtype=cast(Dtype, dtype_code(t.dtype)),
                                                   shape=list(t.shape))
    components = {
        c.name: Component(kind=c.kind, adapter=c.adapter, type=c.type, tensors=refs[c.name], aliases=c.aliases,
                          state=c.json, meta=c.meta)
        for c in captured
    }
    fields: dict[str, Any] = dict(
        name=name,
        created_at=_dt.datetime.now(_dt.timezone.utc),
        environment=environment(),
        progress=progress or Progress(),
        components=components,
        objects={h: ObjectInfo(size=o.size) for h, o in packed.items()},
        data=list(data or []),
        hparams=dict(hparams or {}),
        metrics=dict(metrics or {}),
        lineage=lineage or Lineage(),
    )
    manifest = build_manifest(**fields)  # validated before anything is written
    if codec is None:
        raw = dump_manifest(manifest)
        with r.pending(packed):
            r.write_objects([(h, packed[h].chunks()) for h in r.missing_objects(packed)])
            r.commit(name, raw)
        return manifest
    with r.pending(packed):
        missing = r.missing_objects(packed)
        stored = _write_encoded(r, codec, packed, missing)
        # An object's stored form never changes under its name: only objects this process has not yet written
        # or seen are probed (a frozen backbone's objects once per Repository, not at every save)
        known = _STORED.setdefault(r, {})
        stored.update({h: known[h] for h in packed if h not in stored and h in known})
        stored.update(_stored_codecs(r, [h for h in packed if h not in stored]))
        known.update(stored)
        fields["objects"] = {h: ObjectInfo(size=o.size, codec=stored[h]) for h, o in packed.items()}
        manifest = build_manifest(**fields)
        r.commit(name, dump_manifest(manifest))
    return manifest


_STORED: weakref.WeakKeyDictionary[Repository, dict[str, str | None]] = weakref.WeakKeyDictionary()
"""Per open Repository, the stored form (codec or None: raw) of each object a save wrote or probed."""


def _write_encoded(
    r: Repository, codec: str, packed: dict[str, PackedObject], missing: list[str]
) -> dict[str, str | None]:
    """Encode and write the ``missing`` objects: encoded in parallel, at most :data:`ENCODE_BATCH` bytes of them
    ahead of the writing, and handed to the repository in order as each is ready, so the encoding of the next
    objects overlaps the writing (the upload, on S3) of the first; the codec each was stored with (None: it did
    not shrink enough, stored raw)."""
    out: dict[str, str | None] = {}
    workers = min(os.cpu_count() or 1, 8)

    def one(h: str) -> tuple[str, list[memoryview]]:
        obj = packed[h]
        enc = codecs.encode(codec, obj.buffers, obj.size)
        out[h] = None if enc is None else codec
        return h, enc if enc is not None else obj.buffers

    def encoded(pool: concurrent.futures.ThreadPoolExecutor) -> Iterator[tuple[str, list[memoryview]]]:
        queued: collections.deque[tuple[int, concurrent.futures.Future[tuple[str, list[memoryview]]]]] = (
            collections.deque())  # fmt: skip
        todo = iter(missing)
        ahead = 0
        try:
            while True:
                for h in todo:  # keep the pool busy, within the batch's bytes (at least one object)
                    queued.append((packed[h].size, pool.submit(one, h)))
                    ahead += packed[h].size
                    if ahead >= ENCODE_BATCH:
                        break
                if not queued:
                    return
                size, first = queued.popleft()
                item = first.result()
                ahead -= size
                yield item
        finally:
            for _, f in queued:  # the writing failed: what was not started is not encoded
                f.cancel()

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckptkit-encode") as pool:
        r.write_objects(encoded(pool))
    return out


def _stored_codecs(r: Repository, hashes: list[str]) -> dict[str, str | None]:
    """The stored form of objects the repository already holds (their first bytes say it)."""
    def one(h: str) -> str | None:
        try:
            return codecs.stored_codec(r.read_object_prefix(h))
        except FileNotFoundError:  # pragma: no cover - it existed a moment ago; gc cannot delete it under pending
            return None

    if not hashes:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(len(hashes), 8), thread_name_prefix="ckptkit-probe") as pool:
        return dict(zip(hashes, pool.map(one, hashes), strict=True))
