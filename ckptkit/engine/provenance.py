"""Lineage that follows the live objects: where a model's weights came from, whichever API put them there.

A restore, continue, transfer or import into a model records an :class:`Origin` on the model object itself (a weak
reference: nothing is kept alive). The next save of that model, into any repository, through ``ckptkit.save`` or
any :class:`~ckptkit.CheckpointManager`, records the edge: relation, parents (with their repository when it is
another one), the changes or the per-tensor plan, and the data segments that went into the weights. A save then
moves the model on to ``train`` from the checkpoint it committed, so the chain continues. Internal engine.

Example:
    >>> import torch
    >>> from ckptkit.schema import Parent
    >>> model = torch.nn.Linear(2, 2)
    >>> set_origin([model], Origin("resume", (Parent(id="a" * 64, relation="resume", name="s1"),), url="memory://r"))
    >>> edge = lineage_for({"model": model}, "memory://other")
    >>> edge.lineage.relation, edge.lineage.parents[0].url
    ('resume', 'memory://r')
"""

from __future__ import annotations

import concurrent.futures
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ckptkit.schema import DataSegment, Lineage, Manifest, Parent, Relation

__all__ = ["Edge", "Origin", "add_origin", "lineage_for", "merge_segments", "models_of", "origin_of", "relation_of",
           "restored", "saved", "segment_key", "set_origin"]  # fmt: skip

# When the weights of one save came by several ways (a fusion model: a transfer into one branch, a resume of the
# other), the edge's relation is the most telling of its parents' relations.
_RANK: dict[str, int] = {"transfer": 5, "continue": 4, "import": 3, "resume": 2, "train": 1, "init": 0}


@dataclass(frozen=True)
class Origin:
    """Where a live model's weights came from.

    Attributes:
        relation: how (``resume``, ``continue``, ``transfer``, ``import``, ``train``).
        parents: the checkpoints they came from; ``Parent.url`` is filled in by :func:`lineage_for`.
        url: the repository of the parents (None: unknown, e.g. a foreign file).
        source: for an import or a transfer from files: what they were.
        data: the data segments the weights were trained on (those of the parents, each once).
        pending: an async save still being written: the parent is the manifest it commits.
        before: the origin to fall back to when that pending save fails.
        by: the run (a manager's ``run`` id) that recorded it; None for the functions.
        also: an earlier origin still waiting for its async save, merged under this one once committed.
    """

    relation: Relation
    parents: tuple[Parent, ...] = ()
    url: str | None = None
    source: Mapping[str, Any] | None = None
    data: tuple[DataSegment, ...] = ()
    pending: concurrent.futures.Future[Manifest] | None = field(default=None, compare=False)
    before: Origin | None = field(default=None, compare=False)
    by: str | None = None
    also: Origin | None = field(default=None, compare=False)  # merged in once its async save is committed


@dataclass(frozen=True)
class Edge:
    """What a save records: the lineage, and the data segments inherited from the parents."""

    lineage: Lineage
    data: list[DataSegment]


_origins: weakref.WeakKeyDictionary[torch.nn.Module, Origin] = weakref.WeakKeyDictionary()


def models_of(state: Mapping[str, object] | Iterable[object]) -> dict[str, torch.nn.Module]:
    """The model components of ``state`` by name (or, for a list of objects, by position)."""
    items = state.items() if isinstance(state, Mapping) else ((str(i), o) for i, o in enumerate(state))
    return {str(n): o for n, o in items if isinstance(o, torch.nn.Module)}


def set_origin(models: Iterable[torch.nn.Module], origin: Origin) -> None:
    """Record that the weights of ``models`` now come from ``origin`` (replacing what they came from)."""
    for m in models:
        _origins[m] = origin


def add_origin(model: torch.nn.Module, origin: Origin) -> None:
    """Record that some of ``model``'s weights now come from ``origin`` as well (a transfer into one branch): the
    model keeps the parents it has not been saved since, and gains these. Never waits: when the model's last save
    is still being written, the two are merged once it is committed."""
    now = _origins.get(model)
    if now is not None and now.pending is not None and not now.pending.done():
        _origins[model] = replace(origin, also=now)
        return
    _origins[model] = _merge(origin_of(model), origin)


def _merge(now: Origin | None, origin: Origin) -> Origin:
    """``origin`` on top of what the weights came from before (``now``)."""
    if now is None or now.relation == "init":
        return origin
    keep = tuple(p for p in _absolute(now) if all(p.id != q.id for q in origin.parents))
    transfers = [*((now.source or {}).get("transfers", [])), *((origin.source or {}).get("transfers", []))]
    source = {"transfers": transfers} if transfers else (origin.source or now.source)
    relation = origin.relation if _RANK[origin.relation] >= _RANK[now.relation] else now.relation
    return Origin(relation, (*keep, *_absolute(origin)), None, source, now.data, by=origin.by)


def _resolve(o: Origin | None) -> Origin | None:
    """``o`` with its async saves committed (waiting for them) and its merges done."""
    while o is not None and o.pending is not None:
        try:
            m = o.pending.result()
        except BaseException:  # that save failed (its manager raises it): the weights come from before it
            o = o.before
            continue
        o = _after_save(m, o.url, o.by)
    if o is not None and o.also is not None:
        o = _merge(_resolve(o.also), replace(o, also=None))
    return o


def origin_of(model: torch.nn.Module) -> Origin | None:
    """Where ``model``'s weights came from (waiting for an async save in flight), or None when unknown."""
    o = _origins.get(model)
    resolved = _resolve(o)
    if resolved is not o:
        if resolved is None:
            _origins.pop(model, None)
        else:
            _origins[model] = resolved
    return resolved


def _after_save(m: Manifest, url: str | None, by: str | None) -> Origin:
    return Origin("train", (Parent(id=m.id, relation="train", name=m.name),), url, None, tuple(m.data), by=by)


def saved(
    models: Iterable[torch.nn.Module],
    url: str,
    manifest: Manifest | concurrent.futures.Future[Manifest],
    by: str | None = None,
) -> None:
    """``models`` were saved (or, for a future, are being saved) in repository ``url``: their weights now come
    from that checkpoint."""
    for model in models:
        if isinstance(manifest, Manifest):
            _origins[model] = _after_save(manifest, url, by)
        else:
            _origins[model] = Origin("train", url=url, pending=manifest, before=_origins.get(model), by=by)


def _with_url(p: Parent, url: str | None) -> Parent:
    return p if p.url is not None or url is None else p.model_copy(update={"url": url})


def _absolute(o: Origin) -> tuple[Parent, ...]:
    return tuple(_with_url(p, o.url) for p in o.parents)


def lineage_for(state: Mapping[str, object], url: str, run: str | None = None) -> Edge | None:
    """The edge a save of ``state`` into repository ``url`` records, from its models' origins (None when no model
    has one). A parent in ``url`` itself is recorded without its URL; a parent elsewhere keeps it."""
    origins: list[tuple[str, Origin]] = []
    for name, model in models_of(state).items():
        o = origin_of(model)
        if o is not None and o.relation != "init":
            origins.append((name, o))
    if not origins:
        return None
    parents: list[Parent] = []
    sources: list[Mapping[str, Any]] = []
    data: list[DataSegment] = []
    relation: Relation = "train"
    for name, o in origins:
        if _RANK[o.relation] > _RANK[relation]:
            relation = o.relation
        for p in _absolute(o):
            update: dict[str, Any] = {"url": None} if p.url == url else {}
            if p.relation == "transfer" and "into" not in p.changes:
                update["changes"] = {"into": name, **p.changes}
            if all(p.id != q.id for q in parents):
                parents.append(p.model_copy(update=update))
        if o.source and all(o.source is not s for s in sources):
            sources.append(o.source)
        data = merge_segments(data, o.data)
    source: dict[str, Any] | None = None
    if len(sources) == 1:
        source = dict(sources[0])
    elif sources:
        source = {"sources": [dict(s) for s in sources]}
    return Edge(Lineage(relation=relation, parents=parents, run=run, source=source), data)


def segment_key(seg: DataSegment) -> tuple[str | None, ...]:
    """What makes two data segments the same data: the fingerprint, else name, URI and split."""
    return (seg.fingerprint,) if seg.fingerprint else (None, seg.name, seg.uri, seg.split)


def merge_segments(inherited: Sequence[DataSegment], new: Sequence[DataSegment]) -> list[DataSegment]:
    """Every segment once, by :func:`segment_key`, in order of first appearance; a segment in ``new`` replaces an
    inherited one with the same key (its ``samples_consumed`` is the newer count)."""
    out: list[DataSegment] = []
    index: dict[tuple[str | None, ...], int] = {}
    for seg in (*inherited, *new):
        k = segment_key(seg)
        if k in index:
            out[index[k]] = seg
        else:
            index[k] = len(out)
            out.append(seg)
    return out


def relation_of(parents: Sequence[Parent]) -> Relation:
    """The relation of an edge with these parents: the most telling of theirs (``init`` without parents)."""
    relation: Relation = "init"
    for p in parents:
        if _RANK[p.relation] > _RANK[relation]:
            relation = p.relation
    return relation


def restored(state: Mapping[str, object], m: Manifest, url: str, relation: Relation = "resume",
             changes: Mapping[str, Any] | None = None, by: str | None = None) -> None:  # fmt: skip
    """The models of ``state`` that checkpoint ``m`` of repository ``url`` was restored into now come from it."""
    parent = Parent(id=m.id, relation=relation, name=m.name, changes=dict(changes or {}))
    models = [o for n, o in models_of(state).items() if n in m.components]
    set_origin(models, Origin(relation, (parent,), url, None, tuple(m.data), by=by))
