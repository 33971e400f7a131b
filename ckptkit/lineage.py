"""Lineage: walk, render, verify and compare the hash-chained history of checkpoints, across repositories.

A manifest names its parents by id (the hash of the parent's manifest) and, when the parent lives elsewhere,
by repository URL. Manifests of checkpoints pruned by retention are archived under ``<repo>/lineage/<id>.json``
(their objects are collected), so a fine-tuned model's whole history stays readable and verifiable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ckptkit.api import _check_object, load_tensors, open_repository
from ckptkit.errors import CheckpointNotFoundError, ManifestError
from ckptkit.schema import Manifest, parse_manifest
from ckptkit.storage import Repository


@dataclass
class Node:
    """One checkpoint of a history: its manifest, where it lives, and whether only its manifest survives."""

    manifest: Manifest
    url: str
    archived: bool = False

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def label(self) -> str:
        return f"{self.manifest.name} (step {self.manifest.progress.global_step})"


@dataclass
class History:
    """The ancestry DAG of a checkpoint: nodes newest first, edges child -> parent, and parents not found."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (child id, parent id, relation)
    missing: dict[str, str] = field(default_factory=dict)  # parent id -> why it could not be read

    def node(self, id_: str) -> Node | None:
        return next((n for n in self.nodes if n.id == id_), None)


class _Index:
    """Finds manifests by id in repositories, opening each repository once."""

    def __init__(self, storage_options: dict[str, Any] | None) -> None:
        self.options = storage_options
        self.repos: dict[str, Repository] = {}
        self.by_id: dict[str, dict[str, tuple[Manifest, bool]]] = {}

    def repo(self, url: str) -> Repository:
        if url not in self.repos:
            self.repos[url] = open_repository(url, self.options)
        return self.repos[url]

    def scan(self, url: str) -> dict[str, tuple[Manifest, bool]]:
        if url not in self.by_id:
            r = self.repo(url)
            found: dict[str, tuple[Manifest, bool]] = {}
            for name in r.list():
                try:
                    m = parse_manifest(r.read_manifest(name), f"{r.url}/checkpoints/{name}.json")
                except (ManifestError, CheckpointNotFoundError):
                    continue  # a broken manifest is reported by verify, not by the walk
                found[m.id] = (m, False)
            self.by_id[url] = found
        return self.by_id[url]

    def find(self, url: str, id_: str, name: str | None) -> tuple[Manifest, bool]:
        r = self.repo(url)
        if name is not None:
            try:
                m = parse_manifest(r.read_manifest(name), f"{r.url}/checkpoints/{name}.json")
                if m.id == id_:
                    return m, False
            except (ManifestError, CheckpointNotFoundError, ValueError):
                pass  # renamed, pruned or replaced: fall back to the index and the archive
        hit = self.scan(url).get(id_)
        if hit is not None:
            return hit
        raw = r.read_archived(id_)
        if raw is None:
            raise CheckpointNotFoundError(url, name or id_)
        return parse_manifest(raw, f"{r.url}/lineage/{id_}.json"), True


def history(
    url: str, name: str | None = None, *, storage_options: dict[str, Any] | None = None, limit: int = 100_000
) -> History:
    """Every ancestor of checkpoint ``name`` (the latest when None), across repositories, newest first.

    Example:
        >>> import torch, ckptkit
        >>> mgr = ckptkit.CheckpointManager("memory://doc-history", {"model": torch.nn.Linear(2, 2)})
        >>> _ = mgr.save(1); _ = mgr.save(2)
        >>> [(n.manifest.name, n.manifest.lineage.relation) for n in history("memory://doc-history").nodes]
        [('step-00000002', 'train'), ('step-00000001', 'init')]
    """
    from ckptkit.api import inspect

    index = _Index(storage_options)
    head = inspect(index.repo(url), name)
    out = History()
    todo: list[tuple[Manifest, str, bool]] = [(head, url, False)]
    seen: set[str] = set()
    while todo and len(out.nodes) < limit:
        m, where, archived = todo.pop()
        if m.id in seen:
            continue
        seen.add(m.id)
        out.nodes.append(Node(m, where, archived))
        for p in m.lineage.parents:
            out.edges.append((m.id, p.id, p.relation))
            purl = p.url or where
            try:
                pm, parch = index.find(purl, p.id, p.name)
            except (CheckpointNotFoundError, ManifestError, OSError, ValueError) as err:
                out.missing[p.id] = f"{p.name or p.id[:12]} in {purl}: {err}"
                continue
            todo.append((pm, purl, parch))
    out.nodes.sort(key=lambda n: (n.manifest.created_at, n.manifest.progress.global_step), reverse=True)
    return out


# --- rendering ---------------------------------------------------------------------------------------------

Format = Literal["text", "mermaid", "dot", "json"]


def _short(m: Manifest) -> str:
    bits = [f"step {m.progress.global_step}"]
    if m.metrics:
        bits.append(" ".join(f"{k}={v:.4g}" for k, v in list(m.metrics.items())[:3]))
    return ", ".join(bits)


def render(h: History, fmt: Format) -> str:
    """The DAG as text (indented tree), Mermaid, Graphviz DOT or JSON."""
    if fmt == "json":
        return json.dumps({
            "nodes": [{"id": n.id, "name": n.manifest.name, "url": n.url, "relation": n.manifest.lineage.relation,
                       "step": n.manifest.progress.global_step,
                       "metrics": n.manifest.model_dump(mode="json")["metrics"],
                       "created_at": n.manifest.created_at.isoformat(), "archived": n.archived}
                      for n in h.nodes],
            "edges": [{"child": c, "parent": p, "relation": r} for c, p, r in h.edges],
            "missing": h.missing,
        }, indent=2)  # fmt: skip
    if fmt == "mermaid":
        lines = ["graph BT"]
        for n in h.nodes:
            lines.append(f'  n{n.id[:12]}["{_esc(n.manifest.name)}<br/>{_esc(_short(n.manifest))}"]')
        for c, p, r in h.edges:
            lines.append(f"  n{c[:12]} -->|{r}| n{p[:12]}" if h.node(p) else f"  n{c[:12]} -->|{r}| missing{p[:12]}")
        return "\n".join(lines)
    if fmt == "dot":
        lines = ["digraph lineage {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        for n in h.nodes:
            style = ', style="dashed"' if n.archived else ""
            lines.append(f'  "{n.id[:12]}" [label="{_esc(n.manifest.name)}\\n{_esc(_short(n.manifest))}"{style}];')
        for c, p, r in h.edges:
            lines.append(f'  "{c[:12]}" -> "{p[:12]}" [label="{r}"];')
        lines.append("}")
        return "\n".join(lines)
    return "\n".join(_text(h))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', "'").replace("<", "&lt;").replace(">", "&gt;")


def _text(h: History, fold: int = 3) -> Iterator[str]:
    """An indented tree: a linear chain stays at one depth, each further parent (a fusion's second source)
    opens a deeper level; runs of more than ``fold`` plain ``train`` checkpoints are folded into one line."""
    parents: dict[str, list[tuple[str, str]]] = {}
    for c, p, r in h.edges:
        parents.setdefault(c, []).append((p, r))
    printed: set[str] = set()  # visited by the walk
    shown: set[str] = set()  # printed as a line of their own

    def line(id_: str, relation: str | None, depth: int) -> str:
        pad = "  " * depth + ("<- " if relation else "")
        n = h.node(id_)
        if n is None:
            return f"{pad}[{relation}] {id_[:12]} (not found: {h.missing.get(id_, 'unknown')})"
        rel = f" [{relation}]" if relation else ""
        archived = " archived" if n.archived else ""
        again = " (see above)" if id_ in shown else ""
        shown.add(id_)
        return f"{pad}{n.manifest.name}{rel} {_short(n.manifest)}  {n.id[:12]}{archived}{again}"

    def chain(id_: str, relation: str | None, depth: int) -> Iterator[str]:
        run: list[str] = []  # folded `train` checkpoints not yet printed
        while True:
            n = h.node(id_)
            ps = parents.get(id_, [])
            plain = relation == "train" and n is not None and id_ not in printed and [r for _, r in ps] == ["train"]
            if plain:
                run.append(id_)
            else:
                if len(run) > fold:
                    first, last = h.node(run[0]), h.node(run[-1])
                    assert first is not None and last is not None
                    yield (f"{'  ' * depth}<- ... {len(run)} train checkpoints, steps "
                           f"{first.manifest.progress.global_step} down to {last.manifest.progress.global_step} ...")
                else:
                    yield from (line(r, "train", depth) for r in run)
                run = []
                yield line(id_, relation, depth)
            if n is None or id_ in printed:
                return
            printed.add(id_)
            if not ps:
                return
            for p, r in ps[1:]:  # further parents branch off one level deeper
                yield from chain(p, r, depth + 1)
            id_, relation = ps[0]

    if h.nodes:
        yield from chain(h.nodes[0].id, None, 0)


# --- verification ------------------------------------------------------------------------------------------


@dataclass
class ChainReport:
    """Result of :func:`verify_chain`: per checkpoint, the problems found (empty when intact)."""

    problems: dict[str, list[str]] = field(default_factory=dict)  # "url name" -> problems
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())


def verify_chain(
    url: str,
    name: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChainReport:
    """Verify a checkpoint and every ancestor: each manifest hashes to its id, each parent link matches, and
    every object of a checkpoint that still has its objects hashes to its name."""
    h = history(url, name, storage_options=storage_options)
    report = ChainReport()
    index = _Index(storage_options)
    checked: dict[tuple[str, str], str | None] = {}
    for n in h.nodes:
        key = f"{n.url} {n.manifest.name}"
        problems = report.problems.setdefault(key, [])
        if progress:
            progress(key)
        report.checked += 1
        if n.archived:
            continue  # pruned by retention: its manifest is verified (parse_manifest), its objects are gone
        r = index.repo(n.url)
        for obj, info in n.manifest.objects.items():
            if (n.url, obj) not in checked:
                checked[(n.url, obj)] = _check_object(r, n.manifest, obj, info.size)
            if checked[(n.url, obj)]:
                problems.append(str(checked[(n.url, obj)]))
    for pid, why in h.missing.items():
        report.problems.setdefault(f"parent {pid[:12]}", []).append(f"ancestor cannot be verified: {why}")
    return report


# --- diff --------------------------------------------------------------------------------------------------


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
    url_a: str, name_a: str | None, url_b: str, name_b: str | None, *, component: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Diff:  # fmt: skip
    """Compare two checkpoints: per tensor of the model component, and their hparams, metrics and data.

    Tensors stored in the same object under the same key are unchanged without being read.
    """
    from ckptkit.api import inspect

    ra, rb = open_repository(url_a, storage_options), open_repository(url_b, storage_options)
    ma, mb = inspect(ra, name_a), inspect(rb, name_b)
    out = Diff()
    dump_a, dump_b = ma.model_dump(mode="json"), mb.model_dump(mode="json")
    out.hparams = _dict_diff(dump_a["hparams"], dump_b["hparams"])
    out.metrics = _dict_diff(dump_a["metrics"], dump_b["metrics"])
    out.data = _dict_diff({d["name"]: d for d in dump_a["data"]}, {d["name"]: d for d in dump_b["data"]})
    models = [n for n, c in ma.components.items() if c.kind == "model" and n in mb.components]
    comp = component or (models[0] if models else None)
    if comp is None:
        return out
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


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    if not (a.is_floating_point() or a.is_complex()):
        a, b = a.double(), b.double()
    a64, b64 = a.double() if a.is_floating_point() else a, b.double() if b.is_floating_point() else b
    denom = float(torch.linalg.vector_norm(a64))
    num = float(torch.linalg.vector_norm(b64 - a64))
    return num / denom if denom > 0 else (math.inf if num > 0 else 0.0)


# --- copy --------------------------------------------------------------------------------------------------


@dataclass
class CopyReport:
    """What :func:`copy` moved."""

    checkpoints: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the destination, identical
    objects_copied: int = 0
    objects_present: int = 0
    bytes_copied: int = 0
    ancestors_archived: int = 0


def copy(
    src: str,
    dst: str,
    names: list[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CopyReport:
    """Copy checkpoints (all when ``names`` is None) from ``src`` to ``dst``, sending only the objects ``dst``
    lacks, verified on the way; the manifests of their ancestors in ``src`` are archived in ``dst`` so the
    history stays whole. ``progress(done_bytes, total_bytes)`` is called as objects are copied."""
    rs = open_repository(src, storage_options)
    rd = open_repository(dst, dst_storage_options if dst_storage_options is not None else storage_options)
    report = CopyReport()
    heads = []
    for n in names if names is not None else rs.list():
        raw = rs.read_manifest(n)
        heads.append((n, raw, parse_manifest(raw, f"{rs.url}/checkpoints/{n}.json")))
    todo: dict[str, int] = {}
    for _, _, m in heads:
        for h, info in m.objects.items():
            if h not in todo:
                if rd.has_object(h):
                    report.objects_present += 1
                    todo[h] = -1
                else:
                    todo[h] = info.size
    total = sum(s for s in todo.values() if s >= 0)
    done = 0
    with rd.pending([h for h, s in todo.items() if s >= 0]):
        for h, size in todo.items():
            if size < 0:
                continue
            data = rs.read_object(h, size)
            rd.write_objects([(h, [data])])
            report.objects_copied += 1
            report.bytes_copied += size
            done += size
            if progress:
                progress(done, total)
        for n, raw, m in heads:
            try:
                rd.commit(n, raw)
                report.checkpoints.append(n)
            except FileExistsError:
                if parse_manifest(rd.read_manifest(n), n).id != m.id:
                    raise
                report.skipped.append(n)
    copied = {m.id for _, _, m in heads}
    for n, _, _ in heads:
        for node in history(src, n, storage_options=storage_options).nodes[1:]:
            if node.url == src and node.id not in copied and rd.read_archived(node.id) is None:
                rd.archive(node.id, _raw(rs, node))
                report.ancestors_archived += 1
    return report


def _raw(r: Repository, node: Node) -> bytes:
    if node.archived:
        raw = r.read_archived(node.id)
        assert raw is not None
        return raw
    return r.read_manifest(node.manifest.name)
