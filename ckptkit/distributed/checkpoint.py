"""``save`` and ``load`` of sharded training state (FSDP2, DTensor, or plain modules on every rank), called on
every rank: models and optimizers go through ``torch.distributed.checkpoint.state_dict`` (optimizer state keyed
by parameter name), everything through DCP into the repository, and each rank's RNG beside its shards."""

from __future__ import annotations

import contextlib
import itertools
import random
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckptkit.distributed.layout import metadata_from_json, rng_name, world_size_of
from ckptkit.distributed.storage import RepositoryReader, RepositoryWriter
from ckptkit.engine.manifests import RepoLike, latest_manifest, open_repository
from ckptkit.engine.provenance import lineage_for, models_of, restored, saved
from ckptkit.engine.restore import Fidelity, RestoreResult
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import (
    ArgumentTypeError,
    CheckpointNotFoundError,
    CkptkitError,
    DistributedCheckpointError,
    InvalidArgumentError,
    ManifestError,
    StateMismatchError,
)
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.hashing import check_name
from ckptkit.schema import Manifest, Progress, dump_manifest, parse_manifest
from ckptkit.state import Saved, Stateful
from ckptkit.state.capture import determinism_flags, state_component
from ckptkit.state.restore import prepare_rng
from ckptkit.storage import Repository

__all__ = ["load", "save"]

ProcessGroup = Any
"""A ``torch.distributed.ProcessGroup`` (``None``: the default group)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group is initialized: saving from one process is
    what the caller asked for here, not a mistake to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank_and_world(pg: ProcessGroup | None) -> tuple[int, int]:
    if not _distributed():
        return 0, 1
    return dist.get_rank(pg), dist.get_world_size(pg)


def _broadcast(value: Any, pg: ProcessGroup | None) -> Any:
    """``value`` of the group's rank 0 (DCP's coordinator), on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0) if pg is not None else 0, group=pg)
    return box[0]


def _templates(state: Mapping[str, object]) -> dict[str, Any]:
    """The state dict DCP saves or loads into: models and optimizers through get_*_state_dict (keyed by FQN,
    sharded as the live objects are), other Stateful objects by their ``state_dict()``, values as they are."""
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(f"state must be a mapping of names to models, optimizers, Stateful objects or "
                                f"values, got {type(state).__name__}")  # fmt: skip
    models = models_of(state)
    out: dict[str, Any] = {}
    for name, obj in state.items():
        check_name(name, "component name")
        if isinstance(obj, torch.nn.Module):
            out[name] = get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(_model_of(name, obj, models), obj)
        elif isinstance(obj, Stateful):
            out[name] = obj.state_dict()
        else:
            out[name] = obj
    return out


def _model_of(name: str, opt: torch.optim.Optimizer, models: Mapping[str, torch.nn.Module]) -> torch.nn.Module:
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for model in models.values():
        if params <= {id(p) for p in model.parameters()}:
            return model
    raise InvalidArgumentError(f"optimizer {name!r} optimizes parameters of no model in state: pass the model it "
                               "optimizes in the same state mapping (its state is keyed by the model's parameter "
                               "names)")  # fmt: skip


def _failure(err: CheckpointException, action: str, url: str) -> CkptkitError:
    """The error to raise for a DCP failure: the ckptkit error a rank raised, else one naming each rank's."""
    causes = {int(r): f[0] if isinstance(f, tuple) else f for r, f in err.failures.items()}
    for cause in causes.values():
        if isinstance(cause, CkptkitError):
            return cause
    fix = ("pass the same model and optimizer structure that was saved (or strict=False to load what fits)"
           if action == "load" else "nothing was committed; fix the failing rank's problem and save again")  # fmt: skip
    return DistributedCheckpointError(url, action, causes, fix)


def save(
    repo: RepoLike,
    state: Mapping[str, object],
    name: str,
    *,
    progress: Progress | None = None,
    metrics: Mapping[str, float] | None = None,
    hparams: Mapping[str, Any] | None = None,
    rng: bool = True,
    process_group: ProcessGroup | None = None,
    object_size: int = DEFAULT_OBJECT_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save sharded training state as checkpoint ``name``; call it on every rank of ``process_group``.

    Models (FSDP2 ``fully_shard``, DTensor, or replicated) and their optimizers are taken through
    ``torch.distributed.checkpoint.state_dict`` (optimizer state keyed by parameter name), other Stateful objects
    by ``state_dict()``, plain values as typed JSON. Each rank writes its own shards as content-addressed objects
    (an unchanged shard is stored once across checkpoints); rank 0 commits the manifest after every rank
    finished, so a rank that fails or dies leaves no checkpoint. Without an initialized process group it saves
    from this one process.

    Args:
        repo: repository URL (any fsspec URL), local path, or an open :class:`~ckptkit.storage.Repository`.
        state: names -> models, optimizers (each with its model in the same mapping), Stateful objects, values.
        name: checkpoint name; an existing name is refused (``CheckpointExistsError``) before anything is written.
        progress, metrics, hparams: recorded in the manifest (rank 0's).
        rng: save each rank's python, numpy and torch RNG state (restored on the same world size).
        process_group: the group that saves (default: the default group).
        object_size: the most bytes of one module's shards packed into one object.

    Returns:
        The committed manifest, on every rank.

    Raises:
        CheckpointExistsError, UnsupportedStateError (a value that would need pickle), StorageError,
        DistributedCheckpointError (a rank failed otherwise: ``.failures`` has each), InvalidArgumentError.

    Example::

        m = ckptkit.distributed.save(url, {"model": model, "optimizer": opt}, f"step-{step:08d}",
                                     progress=ckptkit.schema.Progress(global_step=step))
    """
    check_name(name)
    r = open_repository(repo, storage_options)
    rank, _ = _rank_and_world(process_group)
    sd = _templates(state)
    edge = lineage_for(state, r.url)
    writer = RepositoryWriter(r, name, progress=progress, metrics=metrics, hparams=hparams,
                              lineage=edge.lineage if edge is not None else None, object_size=object_size)  # fmt: skip
    if rng:
        writer.add_component(_capture_rng(rank))
    try:
        with _quiet():
            dcp_save(sd, storage_writer=writer, process_group=process_group, no_dist=not _distributed())
    except CheckpointException as err:
        raise _failure(err, "save", r.url) from err
    finally:
        writer.close()
    raw = _broadcast(None if writer.manifest is None else dump_manifest(writer.manifest), process_group)
    manifest = parse_manifest(raw, f"{r.url}/checkpoints/{name}.json")
    saved(models_of(state).values(), r.url, manifest)
    return manifest


def _capture_rng(rank: int) -> Any:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state_component(rng_name(rank), "rng", "process", state, meta=determinism_flags())


def load(
    repo: RepoLike,
    state: Mapping[str, object],
    name: str | None = None,
    *,
    strict: bool = True,
    rng: bool = True,
    process_group: ProcessGroup | None = None,
    storage_options: dict[str, Any] | None = None,
) -> RestoreResult:
    """Load sharded checkpoint ``name`` (the latest when ``None``) into ``state``; call it on every rank.

    Resharding is DCP's: a checkpoint saved by N ranks loads on any M, into models sharded however they are now
    (FSDP2, DTensor or whole). Every object read is hash-verified. Each rank gets its own RNG state back when M
    equals N (a bit-exact resume); otherwise RNG is left as it is and ``result.fidelity`` says so.

    Args:
        state: the same kind of mapping that was saved: the live models, optimizers (each with its model), Stateful
            objects; for a plain value pass a placeholder: the loaded value is in ``result.values[name]``.
        strict: refuse (``StateMismatchError``) a name or key of ``state`` the checkpoint lacks; with
            ``strict=False`` DCP loads what the checkpoint has.
        rng: restore this rank's RNG state when the world size matches.

    Returns:
        A :class:`~ckptkit.RestoreResult`: ``manifest``, ``values``, ``fidelity`` (``exact`` on a same-size resume
        with RNG).

    Raises:
        CheckpointNotFoundError, CorruptObjectError, IncompleteCheckpointError, ManifestError (not a sharded
        checkpoint, or a damaged one), StateMismatchError, DistributedCheckpointError (a rank failed otherwise).

    Example::

        result = ckptkit.distributed.load(url, {"model": model, "optimizer": opt})
        start = result.progress.global_step
    """
    r = open_repository(repo, storage_options)
    rank, world = _rank_and_world(process_group)
    found = _resolve_name(r, name, process_group)
    manifest = latest_manifest(r, found)
    saved_world = world_size_of(manifest)
    sd = _templates(state)
    md = metadata_from_json(manifest)  # validated before anything is loaded
    paths = _paths(md, manifest.name)
    absent = [n for n in state if not any(p[0] == n for p in paths.values())]
    if absent and strict:
        raise StateMismatchError(", ".join(absent), f"not in checkpoint {manifest.name!r}",
                                 "pass strict=False to load the others")  # fmt: skip
    for n, obj in state.items():
        if n not in absent and not isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, Stateful)):
            # the saved structure, whatever placeholder was passed
            sd[n] = _value_template(md, paths, n, f"of checkpoint {manifest.name!r}, component 'dcp'")
    reader = RepositoryReader(r, manifest.name)
    try:
        for n in absent:
            del sd[n]
        with _quiet():
            dcp_load(sd, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=not strict),
                     process_group=process_group, no_dist=not _distributed())  # fmt: skip
    except CheckpointException as err:
        raise _failure(err, "load", r.url) from err
    result = RestoreResult(manifest)
    issues = result.fidelity.issues
    models = models_of(state)
    for n, obj in state.items():
        if n in absent:
            issues.append(f"{n!r} is not in the checkpoint and starts fresh")
        elif isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, sd[n])
        elif isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_model_of(n, obj, models), obj, sd[n])
        elif isinstance(obj, Stateful):
            obj.load_state_dict(sd[n])
        else:
            result.values[n] = sd[n]
    if not rng:
        issues.append("RNG not restored (rng=False)")
    elif saved_world != world:
        issues.append(f"RNG not restored: saved by {saved_world} rank(s), loaded on {world}; each rank's random "
                      "streams go on from where they are, so training does not resume bit-exactly")  # fmt: skip
    elif rng_name(rank) not in manifest.components:
        issues.append("checkpoint holds no RNG state: random streams (dropout, augmentation) start anew")
    else:
        cname = rng_name(rank)
        comp = manifest.components[cname]
        tensors = load_tensors(r, manifest, [cname])[cname]
        apply = prepare_rng(Saved(comp.kind, comp.state, tensors, comp.aliases, comp.adapter, comp.meta))
        issues.extend(apply())  # last: nothing loaded above draws from the restored streams
    restored(state, manifest, r.url)
    result.fidelity = Fidelity(issues)
    return result


def _paths(md: Metadata, name: str) -> dict[str, list[str | int]]:
    """Each entry's path in the saved state dict (DCP's planner data; the key itself when there is none)."""
    mappings = md.planner_data if isinstance(md.planner_data, dict) else {}
    out: dict[str, list[str | int]] = {}
    for fqn in md.state_dict_metadata:
        path = mappings.get(fqn, (fqn,))
        if not isinstance(path, (tuple, list)) or not path or not isinstance(path[0], str) or not all(
                isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):  # fmt: skip
            raise ManifestError(f"of checkpoint {name!r}, component 'dcp'",
                                f"state.planner_data: the path of {fqn!r} is {str(path)[:80]}, not a list of keys")
        out[fqn] = list(path)
    return out


def _value_template(md: Metadata, paths: Mapping[str, list[str | int]], name: str, where: str) -> Any:
    """The saved value ``name`` rebuilt from the metadata: non-tensor parts decoded, tensors allocated for DCP to
    fill (so a plain value loads whatever placeholder the caller passed)."""
    root: dict[str, Any] = {}
    for fqn, entry in md.state_dict_metadata.items():
        path = paths[fqn]
        if path[0] != name:
            continue
        if isinstance(entry, TensorStorageMetadata):
            value: Any = torch.empty(entry.size, dtype=entry.properties.dtype)
        else:
            value = md.storage_data[MetadataIndex(fqn)].value
        cur: Any = root
        for part, nxt in itertools.pairwise(path):
            if isinstance(cur, list) and isinstance(part, int):
                cur.extend([None] * (part + 1 - len(cur)))
                if cur[part] is None:
                    cur[part] = [] if isinstance(nxt, int) else {}
                cur = cur[part]
            elif isinstance(cur, dict):
                cur = cur.setdefault(part, [] if isinstance(nxt, int) else {})
            else:
                raise ManifestError(where, f"state.planner_data: path {path} does not fit the other entries")
        last = path[-1]
        if isinstance(cur, list) and isinstance(last, int):
            cur.extend([None] * (last + 1 - len(cur)))
            cur[last] = value
        elif isinstance(cur, dict):
            cur[last] = value
        else:
            raise ManifestError(where, f"state.planner_data: path {path} does not fit the other entries")
    return root.get(name)


def _resolve_name(r: Repository, name: str | None, pg: ProcessGroup | None) -> str:
    """The checkpoint every rank loads: ``name``, or the latest as rank 0 sees it (so a save committed meanwhile
    cannot make ranks load different checkpoints)."""
    if name is not None:
        return check_name(name)
    rank, _ = _rank_and_world(pg)
    found: str | None = None
    if rank == 0:
        try:
            found = latest_manifest(r, None).name
        except CheckpointNotFoundError:
            found = None
    found = _broadcast(found, pg)
    if found is None:
        raise CheckpointNotFoundError(r.url, None)
    return str(found)
