"""Lineage: walk the hash-chained history of checkpoints, across repositories. Torch-free (``ckptkit log``).

A manifest names its parents by id (the hash of the parent's manifest) and, when the parent lives elsewhere,
by repository URL. Manifests of checkpoints pruned by retention are archived under ``<repo>/lineage/<id>.json``
(their objects are collected), so a fine-tuned model's whole history stays readable and verifiable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckptkit.engine.manifests import RepoLike, latest_manifest, open_repository, read_manifest
from ckptkit.errors import CheckpointNotFoundError, ManifestError
from ckptkit.schema import Manifest, parse_manifest
from ckptkit.storage import Repository

__all__ = ["History", "Index", "Node", "history"]


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


class Index:
    """Finds manifests by id in repositories, opening each repository once."""

    def __init__(self, storage_options: dict[str, Any] | None) -> None:
        self.options = storage_options
        self.repos: dict[str, Repository] = {}
        self.by_id: dict[str, dict[str, tuple[Manifest, bool]]] = {}

    def repo(self, url: str) -> Repository:
        if url not in self.repos:
            self.repos[url] = open_repository(url, self.options)
        return self.repos[url]

    def add(self, repo: RepoLike, param: str = "url") -> Repository:
        """The repository ``repo`` (a URL, a local path or an open Repository, which is used as it is: the
        storage options are for the other repositories a walk reaches), known from now on by its URL."""
        r = repo if isinstance(repo, Repository) else open_repository(repo, self.options, param=param)
        return self.repos.setdefault(r.url, r)

    def scan(self, url: str) -> dict[str, tuple[Manifest, bool]]:
        if url not in self.by_id:
            r = self.repo(url)
            found: dict[str, tuple[Manifest, bool]] = {}
            for name in r.list():
                try:
                    m = read_manifest(r, name)
                except (ManifestError, CheckpointNotFoundError):
                    continue  # a broken manifest is reported by verify, not by the walk
                found[m.id] = (m, False)
            self.by_id[url] = found
        return self.by_id[url]

    def find(self, url: str, id_: str, name: str | None) -> tuple[Manifest, bool]:
        r = self.repo(url)
        if name is not None:
            try:
                m = read_manifest(r, name)
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
        where = f"{r.url}/lineage/{id_}.json"
        m = parse_manifest(raw, where)
        if m.id != id_:  # parse_manifest checked it against its content; this checks it is the one asked for
            raise ManifestError(where, f"it holds manifest {m.id} ({m.name!r}), not {id_}: an archived manifest was "
                                       "copied or renamed outside ckptkit")  # fmt: skip
        return m, True


def history(
    url: RepoLike, name: str | None = None, *, storage_options: dict[str, Any] | None = None, limit: int = 100_000
) -> History:
    """Every ancestor of checkpoint ``name`` (the latest when None), across repositories, newest first.

    Args:
        url: the repository: URL, local path or open :class:`~ckptkit.storage.Repository`.
        storage_options: for the URLs the walk opens (an open Repository keeps its own).

    Example:
        >>> import torch, ckptkit
        >>> mgr = ckptkit.CheckpointManager("memory://doc-history", {"model": torch.nn.Linear(2, 2)})
        >>> _ = mgr.save(1); _ = mgr.save(2)
        >>> [(n.manifest.name, n.manifest.lineage.relation) for n in history("memory://doc-history").nodes]
        [('step-00000002', 'train'), ('step-00000001', 'init')]
    """
    index = Index(storage_options)
    r = index.add(url)
    head = latest_manifest(r, name)
    out = History()
    todo: list[tuple[Manifest, str, bool]] = [(head, r.url, False)]
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
