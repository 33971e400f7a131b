"""Commit: pack captured components into content-addressed objects, store the missing ones, write the
manifest last. Internal engine (used by the facade, the manager and the importers)."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, cast

import torch

from ckptkit.format import DEFAULT_OBJECT_SIZE, dtype_code, group, pack
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

__all__ = ["commit_captured", "environment"]


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
) -> Manifest:
    """Pack captured components into objects, store the missing ones, and commit the manifest."""
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
    manifest = build_manifest(
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
    raw = dump_manifest(manifest)
    with r.pending(packed):
        r.write_objects([(h, packed[h].chunks()) for h in r.missing_objects(packed)])
        r.commit(name, raw)
    return manifest
