"""Copy checkpoints between repositories, sending only the objects the destination lacks, and archiving the
ancestors' manifests so the history stays whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptkit.engine.manifests import RepoLike, open_repository
from ckptkit.history.graph import Index, Node, history
from ckptkit.schema import parse_manifest
from ckptkit.storage import Repository

__all__ = ["CopyReport", "copy"]


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
    src: RepoLike,
    dst: RepoLike,
    names: list[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CopyReport:
    """Copy checkpoints (all when ``names`` is None) from ``src`` to ``dst``, sending only the objects ``dst``
    lacks, verified on the way; the manifests of their ancestors in ``src`` are archived in ``dst`` so the
    history stays whole. ``progress(done_bytes, total_bytes)`` is called as objects are copied.

    Args:
        src, dst: the repositories: each a URL, local path or open :class:`~ckptkit.storage.Repository`.
        storage_options: for ``src`` and the URLs its history reaches, and for ``dst`` unless
            ``dst_storage_options`` is given (an open Repository keeps its own).
    """
    rs = Index(storage_options).add(src, "src")
    if isinstance(dst, Repository) or dst_storage_options is not None:
        rd = open_repository(dst, dst_storage_options, param="dst")
    else:
        rd = open_repository(dst, storage_options, param="dst")
    report = CopyReport()
    heads = []
    for n in names if names is not None else rs.list():
        raw = rs.read_manifest(n)
        heads.append((n, raw, parse_manifest(raw, f"{rs.url}/checkpoints/{n}.json")))  # the bytes that are copied
    sizes: dict[str, int] = {}
    for _, _, m in heads:
        for h, info in m.objects.items():
            sizes.setdefault(h, info.size)
    # Every object the copied manifests reference is announced before the destination is checked, as a save
    # does (docs/format.md, concurrency contract): a gc there in between keeps the ones already present.
    with rd.pending(sizes):
        missing = set(rd.missing_objects(sizes))
        todo = {h: (size if h in missing else -1) for h, size in sizes.items()}
        report.objects_present = sum(1 for s in todo.values() if s < 0)
        total = sum(s for s in todo.values() if s >= 0)
        done = 0
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
                if parse_manifest(rd.read_manifest(n), f"{rd.url}/checkpoints/{n}.json").id != m.id:
                    raise
                report.skipped.append(n)
    copied = {m.id for _, _, m in heads}
    for n, _, _ in heads:
        for node in history(rs, n, storage_options=storage_options).nodes[1:]:
            if node.url == rs.url and node.id not in copied and rd.read_archived(node.id) is None:
                rd.archive(node.id, _raw(rs, node))
                report.ancestors_archived += 1
    return report


def _raw(r: Repository, node: Node) -> bytes:
    if node.archived:
        raw = r.read_archived(node.id)
        assert raw is not None
        return raw
    return r.read_manifest(node.manifest.name)
