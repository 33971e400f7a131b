"""Reading tensors back: fetch and hash-verify the objects a manifest's components need, and check objects
against what the manifest says they hold. Internal engine."""

from __future__ import annotations

import concurrent.futures

import torch

from ckptkit.errors import CorruptObjectError, IncompleteCheckpointError, ManifestError, UnsupportedStateError
from ckptkit.format import dtype_code, unpack
from ckptkit.schema import Manifest, TensorRef
from ckptkit.storage import Repository

__all__ = ["check_object", "load_tensors", "object_contents", "placement_problem"]


def load_tensors(r: Repository, manifest: Manifest, components: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Read (and hash-verify) the objects that ``components`` need; tensors by component and key, each checked to
    have the dtype and shape its manifest entry declares."""
    needed = sorted({ref.object for c in components for ref in manifest.components[c].tensors.values()})
    for c in components:
        for key, ref in manifest.components[c].tensors.items():
            if ref.object not in manifest.objects:
                raise ManifestError(f"of checkpoint {manifest.name!r}, component {c!r}",
                                    f"tensors.{key}: object {ref.object} is referenced but not listed in `objects`")
    objects: dict[str, dict[str, torch.Tensor]] = {}
    missing = []

    def fetch(h: str) -> dict[str, torch.Tensor] | None:
        try:
            return unpack(r.read_object(h, manifest.objects[h].size), r.object_path(h))
        except FileNotFoundError:
            return None

    # Local disk: two objects in flight, one hashed while the next is read. S3: as many as the backend's budget
    # of ranged GETs (each read hashes on its own thread while its parts arrive; the GETs share that budget).
    remote = max(8, getattr(r.backend, "read_concurrency", 8))
    workers = min(len(needed), 2 if r.local else remote) or 1
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
            found = _unlike(ref, t)
            if found:
                raise CorruptObjectError(r.object_path(ref.object), f"tensor {ref.key!r} {ref.dtype} {ref.shape}",
                                         found, f"{c}.{key}")  # fmt: skip
            assert t is not None
            out[c][key] = t
    return out


def _unlike(ref: TensorRef, t: torch.Tensor | None) -> str | None:
    """How tensor ``t`` (None: absent) differs from what ``ref`` declares, or None when it matches."""
    if t is None:
        return "absent"
    try:
        code = dtype_code(t.dtype)
    except UnsupportedStateError:  # pragma: no cover - unpack only yields dtypes safetensors names
        code = str(t.dtype)
    if code != ref.dtype or list(t.shape) != ref.shape:
        return f"{code} {list(t.shape)}"
    return None


def check_object(r: Repository, manifest: Manifest, h: str, size: int) -> str | None:
    """Why object ``h`` (``size`` bytes) is not what ``manifest`` says, or None: missing, corrupt (its bytes do not
    hash to its name, or do not parse), or lacking a tensor a component places in it with the declared key, dtype
    and shape."""
    contents = object_contents(r, h, size)
    return contents if isinstance(contents, str) else placement_problem(r, manifest, h, contents)


def object_contents(r: Repository, h: str, size: int) -> dict[str, tuple[str, list[int]]] | str:
    """What object ``h`` holds (key -> dtype and shape), read and hash-verified; or why it cannot be read."""
    try:
        tensors = unpack(r.read_object(h, size), r.object_path(h))
    except FileNotFoundError:
        return f"object {r.object_path(h)} is missing"
    except CorruptObjectError as err:
        return str(err)
    return {k: (dtype_code(t.dtype), list(t.shape)) for k, t in tensors.items()}


def placement_problem(
    r: Repository, manifest: Manifest, h: str, contents: dict[str, tuple[str, list[int]]]
) -> str | None:
    """Why object ``h``, holding ``contents``, lacks a tensor that ``manifest`` places in it, or None."""
    for cname, comp in manifest.components.items():
        for key, ref in comp.tensors.items():
            if ref.object != h:
                continue
            found = contents.get(ref.key)
            if found != (ref.dtype, ref.shape):
                shown = "nothing under that key" if found is None else f"{found[0]} {found[1]}"
                return (f"object {r.object_path(h)} lacks tensor {ref.key!r} ({ref.dtype} {ref.shape}) of "
                        f"{cname}.{key} as the manifest describes: it holds {shown}")  # fmt: skip
    return None
