"""Verify a checkpoint's whole history: every manifest hashes to its id, every parent link matches, every
object of a checkpoint that still has its objects hashes to its name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptkit.engine.manifests import RepoLike
from ckptkit.engine.tensors import check_object
from ckptkit.history.graph import Index, history

__all__ = ["ChainReport", "verify_chain"]


@dataclass
class ChainReport:
    """Result of :func:`verify_chain`: per checkpoint, the problems found (empty when intact)."""

    problems: dict[str, list[str]] = field(default_factory=dict)  # "url name" -> problems
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())


def verify_chain(
    url: RepoLike,
    name: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChainReport:
    """Verify a checkpoint and every ancestor: each manifest hashes to its id, each parent link matches, and
    every object of a checkpoint that still has its objects hashes to its name.

    Args:
        url: the repository: URL, local path or open :class:`~ckptkit.storage.Repository`.
        storage_options: for the URLs the walk opens (an open Repository keeps its own).
    """
    index = Index(storage_options)
    h = history(index.add(url), name, storage_options=storage_options)
    report = ChainReport()
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
                checked[(n.url, obj)] = check_object(r, n.manifest, obj, info.size)
            if checked[(n.url, obj)]:
                problems.append(str(checked[(n.url, obj)]))
    for pid, why in h.missing.items():
        report.problems.setdefault(f"parent {pid[:12]}", []).append(f"ancestor cannot be verified: {why}")
    return report
