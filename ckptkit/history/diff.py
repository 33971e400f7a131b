"""Compare two checkpoints: per tensor of a model component, and their hparams, metrics and data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ckptkit.engine.manifests import RepoLike, latest_manifest
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import InvalidArgumentError
from ckptkit.history.graph import Index
from ckptkit.schema import Manifest
from ckptkit.storage import Repository

__all__ = ["Diff", "TensorChange", "diff"]


@dataclass
class TensorChange:
    status: Literal["changed", "unchanged", "added", "removed", "reshaped"]
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    rel_l2: float | None = None


@dataclass
class Diff:
    tensors: dict[str, TensorChange] = field(default_factory=dict)
    hparams: dict[str, list[Any]] = field(default_factory=dict)
    metrics: dict[str, list[Any]] = field(default_factory=dict)
    data: dict[str, list[Any]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.status] = out.get(t.status, 0) + 1
        return out


def _dict_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def diff(
    url_a: RepoLike, name_a: str | None, url_b: RepoLike, name_b: str | None, *, component: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Diff:  # fmt: skip
    """Compare two checkpoints: per tensor of the model component, and their hparams, metrics and data.

    Tensors stored in the same object under the same key are unchanged without being read.

    Args:
        url_a, url_b: the repositories: each a URL, local path or open :class:`~ckptkit.storage.Repository`.
        name_a, name_b: the checkpoints (``None``: the latest).
        storage_options: for the URLs among them (an open Repository keeps its own).
    """
    index = Index(storage_options)
    ra, rb = index.add(url_a, "url_a"), index.add(url_b, "url_b")
    ma, mb = latest_manifest(ra, name_a), latest_manifest(rb, name_b)
    out = Diff()
    dump_a, dump_b = ma.model_dump(mode="json"), mb.model_dump(mode="json")
    out.hparams = _dict_diff(dump_a["hparams"], dump_b["hparams"])
    out.metrics = _dict_diff(dump_a["metrics"], dump_b["metrics"])
    out.data = _dict_diff({d["name"]: d for d in dump_a["data"]}, {d["name"]: d for d in dump_b["data"]})
    if "dcp" in ma.components and "dcp" in mb.components:  # both sharded (ckptkit.distributed): whole tensors
        _sharded(out, ra, ma, rb, mb, component or "model")
        return out
    models = [n for n, c in ma.components.items() if c.kind == "model" and n in mb.components]
    comp = component or (models[0] if models else None)
    if comp is None:
        return out
    for m in (ma, mb):
        if comp not in m.components or m.components[comp].kind != "model":
            have = [n for n, c in m.components.items() if c.kind == "model"]
            raise InvalidArgumentError(f"checkpoint {m.name} has no model component {comp!r} (it has {have}): "
                                       "pass one of those as component= (--component)")  # fmt: skip
    ca, cb = ma.components[comp], mb.components[comp]
    keys_a, keys_b = set(ca.tensors) | set(ca.aliases), set(cb.tensors) | set(cb.aliases)
    need_a = [k for k in ca.tensors if k in cb.tensors and ca.tensors[k] != cb.tensors[k]]
    ta = load_tensors(ra, ma, [comp])[comp] if need_a else {}
    tb = load_tensors(rb, mb, [comp])[comp] if need_a else {}
    for k in sorted(keys_a | keys_b):
        if k not in keys_b:
            out.tensors[k] = TensorChange("removed", shape_a=ca.tensors[k].shape if k in ca.tensors else None)
        elif k not in keys_a:
            out.tensors[k] = TensorChange("added", shape_b=cb.tensors[k].shape if k in cb.tensors else None)
        elif k in ca.aliases or k in cb.aliases:
            continue  # a tied tensor: reported under the name it is stored as
        elif ca.tensors[k].shape != cb.tensors[k].shape:
            out.tensors[k] = TensorChange("reshaped", ca.tensors[k].shape, cb.tensors[k].shape)
        elif ca.tensors[k] == cb.tensors[k]:
            out.tensors[k] = TensorChange("unchanged", ca.tensors[k].shape, cb.tensors[k].shape, 0.0)
        else:
            a, b = ta[k], tb[k]
            same = torch.equal(a, b)
            rel = 0.0 if same else _rel_l2(a, b)
            out.tensors[k] = TensorChange("unchanged" if same else "changed", ca.tensors[k].shape,
                                          cb.tensors[k].shape, rel)  # fmt: skip
    return out


def _sharded(out: Diff, ra: Repository, ma: Manifest, rb: Repository, mb: Manifest, comp: str) -> None:
    """Per whole tensor of two sharded checkpoints: the same chunks in the same objects are unchanged unread;
    others (another world size chunks them differently) are assembled and compared."""
    from ckptkit.distributed import full_state_dict, stored_tensors

    sa, sb = stored_tensors(ma, comp), stored_tensors(mb, comp)
    need = [k for k in sa if k in sb and sa[k].shape == sb[k].shape and sa[k] != sb[k]]
    ta = full_state_dict(ra, ma.name, component=comp, keys=need) if need else {}
    tb = full_state_dict(rb, mb.name, component=comp, keys=need) if need else {}
    for k in sorted(set(sa) | set(sb)):
        if k not in sb:
            out.tensors[k] = TensorChange("removed", shape_a=sa[k].shape)
        elif k not in sa:
            out.tensors[k] = TensorChange("added", shape_b=sb[k].shape)
        elif sa[k].shape != sb[k].shape:
            out.tensors[k] = TensorChange("reshaped", sa[k].shape, sb[k].shape)
        elif sa[k] == sb[k]:
            out.tensors[k] = TensorChange("unchanged", sa[k].shape, sb[k].shape, 0.0)
        else:
            same = torch.equal(ta[k], tb[k])
            out.tensors[k] = TensorChange("unchanged" if same else "changed", sa[k].shape, sb[k].shape,
                                          0.0 if same else _rel_l2(ta[k], tb[k]))  # fmt: skip


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    if not (a.is_floating_point() or a.is_complex()):
        a, b = a.double(), b.double()
    a64, b64 = a.double() if a.is_floating_point() else a, b.double() if b.is_floating_point() else b
    denom = float(torch.linalg.vector_norm(a64))
    num = float(torch.linalg.vector_norm(b64 - a64))
    return num / denom if denom > 0 else (math.inf if num > 0 else 0.0)
