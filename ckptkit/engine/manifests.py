"""Manifests of a repository: open, read, parse and scan. Torch-free, so that the CLI's listing verbs start fast.

Internal engine: every feature module reads manifests through here; the public facade is :mod:`ckptkit.api`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ckptkit.errors import ArgumentTypeError, CheckpointNotFoundError, InvalidArgumentError, ManifestError
from ckptkit.schema import Manifest, parse_manifest, resolve_aliases
from ckptkit.storage import Repository

__all__ = [
    "RepoLike",
    "latest_manifest",
    "list_manifests",
    "model_name",
    "open_repository",
    "read_manifest",
    "reference_problems",
    "scan",
]

log = logging.getLogger("ckptkit")

RepoLike = str | os.PathLike[str] | Repository
"""Where a repository is: a URL, a local path, or an open :class:`~ckptkit.storage.Repository`."""


def open_repository(
    repo: RepoLike, storage_options: dict[str, Any] | None = None, *, param: str = "repo"
) -> Repository:
    """A :class:`Repository` for a URL or a local path (``str`` or ``os.PathLike``, e.g. a ``pathlib.Path``), or
    the open repository itself. ``param`` is the caller's name for the argument, for the error message.

    Raises:
        ArgumentTypeError: (a ``TypeError``) ``repo`` is none of those.
        InvalidArgumentError: (a ``ValueError``) ``storage_options`` given with an open repository, or an empty URL.

    Example:
        >>> from pathlib import Path
        >>> open_repository(Path("/tmp/doc-open")).url
        '/tmp/doc-open'
        >>> open_repository(42, param="source")
        Traceback (most recent call last):
        ...
        ckptkit.errors.ArgumentTypeError: source must be a URL, a local path (str or os.PathLike) or an open ...
    """
    if isinstance(repo, Repository):
        if storage_options:
            raise InvalidArgumentError(
                f"storage_options apply to a URL; {repo.url} is already open: pass its URL with the options, or "
                "drop storage_options"
            )
        return repo
    url = os.fspath(repo) if isinstance(repo, os.PathLike) else repo
    if not isinstance(url, str):  # an int, None, bytes, a bytes path ...
        raise ArgumentTypeError(f"{param} must be a URL, a local path (str or os.PathLike) or an open "
                                f"ckptkit.storage.Repository, got {type(repo).__name__} ({repo!r:.80})")  # fmt: skip
    return Repository(url, storage_options)


def read_manifest(r: Repository, name: str) -> Manifest:
    """The validated manifest of checkpoint ``name``.

    Raises:
        CheckpointNotFoundError: no such checkpoint.
        ManifestError: it does not parse or validate, its id does not match its bytes, or its ``name`` is not the
            name it is stored under (a manifest copied or renamed by hand would restore as another checkpoint).
    """
    where = f"{r.url}/checkpoints/{name}.json"
    manifest = parse_manifest(r.read_manifest(name), where)
    if manifest.name != name:
        raise ManifestError(where, f"it names itself {manifest.name!r}, but it is stored as {name!r}: a manifest was "
                                   "copied or renamed outside ckptkit; restore it under its own name (copy it back "
                                   f"to checkpoints/{manifest.name}.json) or delete it")  # fmt: skip
    return manifest


def reference_problems(manifest: Manifest) -> list[str]:
    """What in ``manifest`` points nowhere, without reading any object: tensors in objects its ``objects`` list
    does not hold, and aliases that loop or name no stored tensor. Empty when every reference resolves."""
    problems: list[str] = []
    for cname, comp in manifest.components.items():
        unlisted = sorted({ref.object for ref in comp.tensors.values() if ref.object not in manifest.objects})
        for h in unlisted:
            keys = [k for k, ref in comp.tensors.items() if ref.object == h]
            problems.append(f"component {cname!r}: tensor(s) {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} "
                            f"are in object {h}, which the manifest's `objects` does not list")  # fmt: skip
        try:
            resolve_aliases(comp.tensors, comp.aliases, f"component {cname!r}")
        except ManifestError as err:
            problems.append(f"{err.where}: {err.problem}")
    return problems


def scan(r: Repository) -> tuple[list[Manifest], list[tuple[str, str]]]:
    """Every committed checkpoint that parses, oldest first (by creation time, then step), and the
    ``(name, reason)`` of those that do not: one unreadable manifest never hides the others."""
    out = []
    failed: list[tuple[str, str]] = []
    for n in r.list():
        try:
            out.append(read_manifest(r, n))
        except CheckpointNotFoundError:
            continue  # deleted while we listed
        except ManifestError as err:  # unparseable, invalid (a naive created_at ...), tampered or misnamed
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


def model_name(m: Manifest, component: str | None, hint: str = "") -> str:
    """The model component of ``m`` a verb works on: ``component``, or the only one when it is None.

    Raises:
        InvalidArgumentError: ``m`` has no model component, several and ``component`` is None, or none named
            ``component`` (the message lists them, then ``hint``).
    """
    models = [n for n, c in m.components.items() if c.kind == "model"]
    if component is None and len(models) == 1:
        return models[0]
    if component is not None and component in models:
        return component
    if not models:
        problem = f"no model component (it has {sorted(m.components)})"
    else:
        given = f"component {component!r} is not one of them" if component is not None else "name one of them"
        problem = f"model components {models}: {given}: pass component=<one of them> (--component on the command line)"
    raise InvalidArgumentError(f"checkpoint {m.name} has {problem}" + (f"; {hint}" if hint else ""))
