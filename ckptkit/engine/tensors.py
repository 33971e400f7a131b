"""Reading tensors back: fetch and hash-verify the objects a manifest's components need, and check objects
against what the manifest says they hold. Internal engine."""

from __future__ import annotations

import concurrent.futures

import torch

from ckptkit.errors import CorruptObjectError, IncompleteCheckpointError, ManifestError
from ckptkit.format import unpack
from ckptkit.schema import Manifest
from ckptkit.storage import Repository

__all__ = ["check_object", "load_tensors"]


def load_tensors(r: Repository, manifest: Manifest, components: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Read (and hash-verify) the objects that ``components`` need; tensors by component and key."""
    needed = sorted({ref.object for c in components for ref in manifest.components[c].tensors.values()})
    for h in needed:
        if h not in manifest.objects:
            raise ManifestError(f"{manifest.name}", f"object {h} is referenced but not listed in `objects`")
    objects: dict[str, dict[str, torch.Tensor]] = {}
    missing = []

    def fetch(h: str) -> dict[str, torch.Tensor] | None:
        try:
            return unpack(r.read_object(h, manifest.objects[h].size), r.object_path(h))
        except FileNotFoundError:
            return None

    # Two objects in flight: one is hashed while the next is read (and remote reads overlap their latency).
    workers = min(len(needed), 2 if r.local else 8) or 1
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckptkit-read") as pool:
        for h, tensors in zip(needed, pool.map(fetch, needed), strict=True):
            if tensors is None:
                missing.append(h)
            else:
                objects[h] = tensors
    if missing:
        raise IncompleteCheckpointError(manifest.name, [r.object_path(h) for h in missing])
    out: dict[str, dict[str, torch.Tensor]] = {}
    for c in components:
        out[c] = {}
        for key, ref in manifest.components[c].tensors.items():
            t = objects[ref.object].get(ref.key)
            if t is None or list(t.shape) != ref.shape:
                raise CorruptObjectError(r.object_path(ref.object), f"tensor {ref.key!r} {ref.shape}",
                                         "absent" if t is None else f"shape {list(t.shape)}")  # fmt: skip
            out[c][key] = t
    return out



def check_object(r: Repository, manifest: Manifest, h: str, size: int) -> str | None:
    try:
        tensors = unpack(r.read_object(h, size), r.object_path(h))
    except FileNotFoundError:
        return f"object {r.object_path(h)} is missing"
    except CorruptObjectError as err:
        return str(err)
    for cname, comp in manifest.components.items():
        for key, ref in comp.tensors.items():
            if ref.object == h and (ref.key not in tensors or list(tensors[ref.key].shape) != ref.shape):
                return f"object {r.object_path(h)} lacks tensor {ref.key!r} of {cname}.{key} as the manifest describes"
    return None
