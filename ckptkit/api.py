"""The public functions: save, restore, inspect, verify, checkpoints, gc.

A thin facade over the internal engine (:mod:`ckptkit.engine`), which the manager and every feature module use
too. Each function takes a repository URL, a local path or an open :class:`~ckptkit.storage.Repository`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptkit.engine.commit import commit_captured
from ckptkit.engine.gc import collect_garbage
from ckptkit.engine.manifests import RepoLike, latest_manifest, list_manifests, open_repository
from ckptkit.engine.restore import Fidelity, RestoreResult, restore_state
from ckptkit.engine.verify import VerifyReport, verify_repository
from ckptkit.errors import InvalidArgumentError
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.hashing import check_name
from ckptkit.schema import DataSegment, Lineage, Manifest, Progress
from ckptkit.state import capture
from ckptkit.storage import GcReport

__all__ = [
    "Fidelity",
    "RepoLike",
    "RestoreResult",
    "VerifyReport",
    "checkpoints",
    "gc",
    "inspect",
    "restore",
    "save",
    "verify",
]


def save(
    repo: RepoLike,
    state: Mapping[str, object],
    name: str,
    *,
    progress: Progress | None = None,
    metrics: Mapping[str, float] | None = None,
    hparams: Mapping[str, Any] | None = None,
    data: list[DataSegment] | None = None,
    lineage: Lineage | None = None,
    rng: bool = True,
    object_size: int = DEFAULT_OBJECT_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save ``state`` as checkpoint ``name``: objects first, manifest last (the commit).

    Args:
        repo: repository URL (any fsspec URL) or an open :class:`Repository`.
        state: components by name: models, optimizers, schedulers, grad scalers, any object with
            ``state_dict()``/``load_state_dict()``, or JSON-able values.
        name: checkpoint name (letters, digits, ``.``, ``_``, ``-``); an existing name is an error.
        progress, metrics, hparams, data, lineage: recorded in the manifest.
        rng: also capture python, numpy, torch CPU and CUDA RNG state.
        object_size: target bytes per stored object.

    Returns:
        The committed manifest (``manifest.id`` is the checkpoint's hash).

    Example:
        >>> import torch, ckptkit
        >>> model = torch.nn.Linear(2, 2)
        >>> m = ckptkit.save("memory://doc-save", {"model": model}, "first")
        >>> m.name, len(m.id)
        ('first', 64)
    """
    check_name(name)
    if object_size <= 0:
        raise InvalidArgumentError(f"object_size={object_size!r}: must be a positive number of bytes per object")
    r = open_repository(repo, storage_options)
    captured = capture(state, rng=rng)
    return commit_captured(r, captured, name, progress=progress, metrics=metrics, hparams=hparams, data=data,
                           lineage=lineage, object_size=object_size)  # fmt: skip


def inspect(repo: RepoLike, name: str | None = None, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The validated manifest of checkpoint ``name`` (the latest when ``None``). Reads no tensors.

    Example:
        >>> import torch, ckptkit
        >>> _ = ckptkit.save("memory://doc-inspect", {"model": torch.nn.Linear(2, 2)}, "a")
        >>> ckptkit.inspect("memory://doc-inspect", "a").components["model"].kind
        'model'
    """
    return latest_manifest(open_repository(repo, storage_options), name)


def checkpoints(repo: RepoLike, storage_options: dict[str, Any] | None = None) -> list[Manifest]:
    """Every committed checkpoint that parses, oldest first (by creation time, then step).

    A manifest that does not parse is skipped with a warning (``ckptkit verify`` reports it).
    """
    return list_manifests(open_repository(repo, storage_options))


def restore(
    repo: RepoLike,
    state: Mapping[str, object],
    name: str | None = None,
    *,
    strict: bool = True,
    rng: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> RestoreResult:
    """Restore checkpoint ``name`` (the latest when ``None``) into the live objects of ``state``.

    Every object read is hash-verified before anything is loaded. Components are restored in dependency
    order (models, optimizers, schedulers, scalers, others) and process RNG last, so nothing a
    ``load_state_dict`` draws shifts the restored streams.

    Args:
        strict: raise :class:`StateMismatchError` when keys or shapes differ; with ``strict=False`` load what
            fits and return the per-component reports.
        rng: restore process RNG state when the checkpoint has it.

    Raises:
        CheckpointNotFoundError, CorruptObjectError, IncompleteCheckpointError, StateMismatchError.

    Example:
        >>> import torch, ckptkit
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = ckptkit.save("memory://doc-restore", {"model": model}, "a")
        >>> ckptkit.restore("memory://doc-restore", {"model": torch.nn.Linear(2, 2)}).manifest.name
        'a'
    """
    return restore_state(open_repository(repo, storage_options), state, name, strict=strict, rng=rng)


def verify(
    repo: RepoLike, name: str | None = None, storage_options: dict[str, Any] | None = None
) -> list[VerifyReport]:
    """Check checkpoints end to end: manifest parses and matches its id, every object exists and hashes to its
    name, every tensor is where the manifest says. ``name=None`` verifies every checkpoint.

    Example:
        >>> import torch, ckptkit
        >>> _ = ckptkit.save("memory://doc-verify", {"model": torch.nn.Linear(2, 2)}, "a")
        >>> [r.ok for r in ckptkit.verify("memory://doc-verify")]
        [True]
    """
    return verify_repository(open_repository(repo, storage_options), name)


def gc(repo: RepoLike, dry_run: bool = False, storage_options: dict[str, Any] | None = None) -> GcReport:
    """Delete objects no committed checkpoint references (never those of a save in progress).

    Refuses to run while a manifest in the repository cannot be parsed, since its objects would look
    unreferenced. Returns a :class:`~ckptkit.storage.GcReport`.

    Example:
        >>> import torch, ckptkit
        >>> _ = ckptkit.save("memory://doc-gc", {"model": torch.nn.Linear(2, 2)}, "a")
        >>> ckptkit.api.gc("memory://doc-gc").objects_removed
        0
    """
    return collect_garbage(open_repository(repo, storage_options), dry_run)
