"""Retention for sharded checkpoints: which of a repository's sharded checkpoints to prune after a save.

Only rank 0 (DCP's coordinator) prunes, after its commit, so ranks never race to delete; the other ranks never
delete anything. A pruned checkpoint's manifest moves to ``lineage/`` (its history stays readable) and gc then
collects the objects nothing references any more; gc never deletes an object of a save in flight on any rank
(each rank's pending record names its objects until the commit, see :mod:`ckptkit.storage.repository`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from ckptkit.distributed.layout import DCP
from ckptkit.engine.gc import collect_garbage
from ckptkit.engine.manifests import RepoLike, list_manifests, open_repository
from ckptkit.errors import CheckpointNotFoundError, RepositoryBusyError
from ckptkit.schema import Manifest

__all__ = ["RetentionLike", "prune"]


@runtime_checkable
class RetentionLike(Protocol):
    """Retention rules: :class:`ckptkit.Retention` (``keep_last``, ``keep_best``, ``keep_every``) is one."""

    def keep(self, manifests: list[Manifest]) -> set[str]:
        """Names of the checkpoints to keep among ``manifests`` (oldest first)."""
        ...


def prune(repo: RepoLike, retention: RetentionLike, *, keep: Iterable[str] = (), gc: bool = True) -> list[str]:
    """Prune the repository's sharded checkpoints by ``retention``; the names pruned. Call it from one process
    (:func:`ckptkit.distributed.save` with ``retention=`` calls it on rank 0 after its commit).

    Never pruned: the newest sharded checkpoint, those named in ``keep`` (``save`` passes the checkpoints this
    process loaded: the one the run resumed from), any checkpoint a committed checkpoint resumed, continued or was
    transferred from (a lineage parent other than ``train``), and checkpoints that are not sharded.

    Args:
        repo: repository URL, local path or open :class:`~ckptkit.storage.Repository`.
        retention: the rules, e.g. ``ckptkit.Retention(keep_last=3)``.
        keep: names never to prune.
        gc: collect the garbage of the pruned checkpoints afterwards (skipped while another gc runs).

    Example::

        ckptkit.distributed.prune(url, ckptkit.Retention(keep_last=2), keep=["step-00001000"])
    """
    r = open_repository(repo)
    found = list_manifests(r)
    sharded = [m for m in found if DCP in m.components]
    if not sharded:
        return []
    started_from = {p.id for m in found for p in m.lineage.parents if p.relation != "train"}
    kept = retention.keep(sharded) | {sharded[-1].name} | set(keep)
    pruned = []
    for m in sharded:
        if m.name in kept or m.id in started_from:
            continue
        try:
            r.retire(m.name, m.id)  # moved to lineage/: its history stays readable
            pruned.append(m.name)
        except CheckpointNotFoundError:
            continue  # pruned meanwhile by another process
    if pruned and gc:
        with contextlib.suppress(RepositoryBusyError):  # another gc is running: it, or the next, collects these
            collect_garbage(r)
    return pruned
