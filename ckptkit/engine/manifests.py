"""Manifests of a repository: open, read, parse and scan. Torch-free, so that the CLI's listing verbs start fast.

Internal engine: every feature module reads manifests through here; the public facade is :mod:`ckptkit.api`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ckptkit.errors import CheckpointNotFoundError, InvalidArgumentError, ManifestError
from ckptkit.schema import Manifest, parse_manifest
from ckptkit.storage import Repository

__all__ = ["RepoLike", "latest_manifest", "list_manifests", "open_repository", "read_manifest", "scan"]

log = logging.getLogger("ckptkit")

RepoLike = str | os.PathLike[str] | Repository
"""Where a repository is: a URL, a local path, or an open :class:`~ckptkit.storage.Repository`."""


def open_repository(repo: RepoLike, storage_options: dict[str, Any] | None = None) -> Repository:
    """A :class:`Repository` for a URL or path (or the repository itself)."""
    if isinstance(repo, Repository):
        if storage_options:
            raise InvalidArgumentError(
                f"storage_options apply to a URL; {repo.url} is already open: pass its URL with the options, or "
                "drop storage_options"
            )
        return repo
    return Repository(repo, storage_options)


def read_manifest(r: Repository, name: str) -> Manifest:
    """The validated manifest of checkpoint ``name``."""
    return parse_manifest(r.read_manifest(name), f"{r.url}/checkpoints/{name}.json")


def scan(r: Repository) -> tuple[list[Manifest], list[tuple[str, str]]]:
    """Every committed checkpoint that parses, oldest first (by creation time, then step), and the
    ``(name, reason)`` of those that do not."""
    out = []
    failed: list[tuple[str, str]] = []
    for n in r.list():
        try:
            out.append(read_manifest(r, n))
        except CheckpointNotFoundError:
            continue  # deleted while we listed
        except ManifestError as err:
            log.warning("skipping checkpoint %s: %s", n, err)
            failed.append((n, str(err)))
    out.sort(key=lambda m: (m.created_at, m.progress.global_step, m.name))
    return out, failed


def list_manifests(r: Repository) -> list[Manifest]:
    """Every committed checkpoint that parses, oldest first; unreadable ones are skipped with a warning."""
    return scan(r)[0]


def latest_manifest(r: Repository, name: str | None = None) -> Manifest:
    """Checkpoint ``name``, or the latest one when ``None``.

    Raises:
        CheckpointNotFoundError: no such checkpoint, or the repository holds none.
    """
    if name is not None:
        return read_manifest(r, name)
    found = list_manifests(r)
    if not found:
        raise CheckpointNotFoundError(r.url, None)
    return found[-1]
