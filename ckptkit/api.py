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
from ckptkit.engine.provenance import lineage_for, merge_segments, models_of, relation_of, restored, saved
from ckptkit.engine.restore import Fidelity, RestoreResult, restore_state
from ckptkit.engine.verify import VerifyReport, verify_repository
from ckptkit.errors import InvalidArgumentError, VerificationError
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.hashing import check_name
from ckptkit.schema import DataSegment, Lineage, Manifest, Parent, Progress
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
    parents: list[Parent] | None = None,
    rng: bool = True,
    object_size: int = DEFAULT_OBJECT_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save ``state`` as checkpoint ``name``: objects first, manifest last (the commit).

    Args:
        repo: repository URL (any fsspec URL), local path, or an open :class:`Repository`.
        state: components by name: models, optimizers, schedulers, grad scalers, any object with
            ``state_dict()``/``load_state_dict()``, or JSON-able values.
        name: checkpoint name (letters, digits, ``.``, ``_``, ``-``); an existing name is an error.
        progress, metrics, hparams: recorded in the manifest.
        data: the data segments this save's training read. The manifest lists them after those the models'
            weights had already seen (inherited from the checkpoints they were restored, continued or imported
            from), every segment once.
        lineage, parents: the lineage edge, or just its parents (the relation is theirs). By default the edge
            follows the models: after ``ckptkit.restore``, ``ckptkit.transfer``, a manager's ``continue_from`` or
            an earlier save of the same model object, this save records where its weights came from (relation,
            parent id and repository, changes, transfer plan).
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
    if lineage is not None and parents is not None:
        raise InvalidArgumentError("save: pass lineage= or parents=, not both (parents= is the edge's parents)")
    r = open_repository(repo, storage_options)
    edge = lineage_for(state, r.url)
    if lineage is None:
        if parents is not None:
            lineage = Lineage(relation=relation_of(parents), parents=list(parents))
        elif edge is not None:
            lineage = edge.lineage
    data = merge_segments(edge.data if edge is not None else [], data or [])
    captured = capture(state, rng=rng)
    m = commit_captured(r, captured, name, progress=progress, metrics=metrics, hparams=hparams, data=data,
                        lineage=lineage, object_size=object_size)  # fmt: skip
    saved(models_of(state).values(), r.url, m)
    return m


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

    The next save of the restored models (into any repository, by any API) records lineage ``resume`` from this
    checkpoint, and the data segments it lists.

    Raises:
        CheckpointNotFoundError, CorruptObjectError, IncompleteCheckpointError, StateMismatchError.

    Example:
        >>> import torch, ckptkit
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = ckptkit.save("memory://doc-restore", {"model": model}, "a")
        >>> ckptkit.restore("memory://doc-restore", {"model": torch.nn.Linear(2, 2)}).manifest.name
        'a'
    """
    r = open_repository(repo, storage_options)
    result = restore_state(r, state, name, strict=strict, rng=rng)
    restored(state, result.manifest, r.url)  # the next save of these models records `resume` from it
    return result


def verify(
    repo: RepoLike,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    raise_on_error: bool = False,
) -> list[VerifyReport]:
    """Check checkpoints end to end: the manifest is the bytes ckptkit committed and matches its id, every object
    exists and hashes to its name, every tensor is where the manifest says. ``name=None`` verifies every checkpoint.

    Args:
        repo: URL, local path or open :class:`~ckptkit.storage.Repository`.
        name: the checkpoint to verify; ``None`` verifies every one.
        raise_on_error: raise :class:`~ckptkit.errors.VerificationError` when any checkpoint is damaged, instead
            of returning its report.

    Returns:
        One :class:`VerifyReport` per checkpoint: ``ok``, ``problems`` and the damaged ``files`` (its manifest
        ``<repo>/checkpoints/<name>.json``, or the objects missing or corrupt).

    Raises:
        VerificationError: (an ``OSError``) with ``raise_on_error=True``, a checkpoint is damaged; the message names
            each damaged checkpoint and file, ``reports`` holds every report.
        InvalidNameError: ``name`` breaks the naming rule (a missing or damaged checkpoint is a report instead).

    Example:
        >>> import torch, ckptkit
        >>> from ckptkit.storage import Repository
        >>> _ = ckptkit.save("memory://doc-verify", {"model": torch.nn.Linear(2, 2)}, "a")
        >>> [r.ok for r in ckptkit.verify("memory://doc-verify")]
        [True]
        >>> _ = ckptkit.save("memory://doc-verify", {"model": torch.nn.Linear(2, 2)}, "b")
        >>> r = Repository("memory://doc-verify")
        >>> r.fs.pipe_file(r.manifest_path("b"), r.read_manifest("b") + b"\\n")  # edited after its commit
        >>> [(rep.name, rep.ok, rep.files) for rep in ckptkit.verify("memory://doc-verify")]
        [('a', True, []), ('b', False, ['memory://doc-verify/checkpoints/b.json'])]
        >>> ckptkit.verify("memory://doc-verify", raise_on_error=True)
        Traceback (most recent call last):
        ...
        ckptkit.errors.VerificationError: 1 of 2 checkpoint(s) in memory://doc-verify failed verification:
        b (memory://doc-verify/checkpoints/b.json) ...; a restore without a name falls back to the newest ...
    """
    r = open_repository(repo, storage_options)
    reports = verify_repository(r, name)
    if raise_on_error and not all(rep.ok for rep in reports):
        raise VerificationError(r.url, reports)
    return reports


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
