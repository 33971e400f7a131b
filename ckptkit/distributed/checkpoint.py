"""``save`` and ``load`` of sharded training state (FSDP2, DTensor, or plain modules on every rank), called on
every rank: models and optimizers go through ``torch.distributed.checkpoint.state_dict`` (optimizer state keyed
by parameter name), everything through DCP into the repository, and each rank's RNG beside its shards."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
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
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckptkit.distributed.layout import entry_paths, metadata_from_json, rng_name, world_size_of
from ckptkit.distributed.retention import RetentionLike, prune
from ckptkit.distributed.storage import RepositoryReader, RepositoryWriter
from ckptkit.engine.manifests import RepoLike, latest_manifest, open_repository
from ckptkit.engine.provenance import Origin, lineage_for, models_of, saved, set_origin
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
    StorageTimeoutError,
)
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.hashing import check_name
from ckptkit.schema import Manifest, Parent, Progress, dump_manifest, parse_manifest
from ckptkit.state import Saved, Stateful
from ckptkit.state.capture import determinism_flags, state_component
from ckptkit.state.restore import prepare_rng
from ckptkit.storage import Repository

__all__ = ["AsyncSave", "async_save", "load", "save", "wait"]

log = logging.getLogger("ckptkit")

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


def _failure(err: BaseException, action: str, url: str, rank: int) -> BaseException:
    """The error to raise for a failed DCP call: the ckptkit error a rank raised, else one naming each rank's
    (DCP's ``CheckpointException``, or a collective's own error: a peer that died); anything that is no
    ``Exception`` (``KeyboardInterrupt``) as it is."""
    if isinstance(err, CheckpointException):
        causes = {int(r): f[0] if isinstance(f, tuple) else f for r, f in err.failures.items()}
    elif isinstance(err, CkptkitError) or not isinstance(err, Exception):
        return err
    else:
        causes = {rank: err}
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
    retention: RetentionLike | None = None,
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
    from this one process. An :func:`async_save` still in flight in this process is waited for first (its error,
    not yet raised, is raised here instead of saving).

    Args:
        repo: repository URL (any fsspec URL), local path, or an open :class:`~ckptkit.storage.Repository`.
        state: names -> models, optimizers (each with its model in the same mapping), Stateful objects, values.
        name: checkpoint name; an existing name is refused (``CheckpointExistsError``) before anything is written.
        progress, metrics, hparams: recorded in the manifest (rank 0's).
        rng: save each rank's python, numpy and torch RNG state (restored on the same world size).
        retention: after the commit, rank 0 alone prunes the repository's sharded checkpoints by these rules
            (e.g. ``ckptkit.Retention(keep_last=3)``) and collects their garbage; see :func:`prune` for what is
            never pruned (the newest, the one this run resumed from).
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
    _settle()
    job = _Job(repo, state, name, progress, metrics, hparams, rng, retention, process_group, object_size,
               storage_options)  # fmt: skip
    try:
        with _quiet():
            dcp_save(job.sd, storage_writer=job.writer, process_group=process_group, no_dist=not _distributed())
    except BaseException as err:
        job.writer.close()
        failure = _failure(err, "save", job.r.url, job.rank)
        if failure is err:
            raise
        raise failure from err
    manifest = job.finish(process_group)
    saved(models_of(state).values(), job.r.url, manifest)
    return manifest


class _Job:
    """One save's writer and state dict, made on the caller's thread; :meth:`finish` runs once DCP returned."""

    def __init__(self, repo: RepoLike, state: Mapping[str, object], name: str, progress: Progress | None,
                 metrics: Mapping[str, float] | None, hparams: Mapping[str, Any] | None, rng: bool,
                 retention: RetentionLike | None, pg: ProcessGroup | None, object_size: int,
                 storage_options: dict[str, Any] | None) -> None:  # fmt: skip
        check_name(name)
        if retention is not None and not callable(getattr(retention, "keep", None)):
            raise ArgumentTypeError(f"retention must be a ckptkit.Retention (an object with keep(manifests)), got "
                                    f"{type(retention).__name__}")  # fmt: skip
        self.r = open_repository(repo, storage_options)
        self.rank, _ = _rank_and_world(pg)
        self.name = name
        self.retention = retention
        self.sd = _templates(state)
        edge = lineage_for(state, self.r.url)
        self.writer = RepositoryWriter(self.r, name, progress=progress, metrics=metrics, hparams=hparams,
                                       lineage=edge.lineage if edge is not None else None,
                                       object_size=object_size)  # fmt: skip
        if rng:
            self.writer.add_component(_capture_rng(self.rank))

    def finish(self, pg: ProcessGroup | None) -> Manifest:
        """After DCP's save returned on this rank: drop this rank's pending record, prune (rank 0, after the
        commit), and return the committed manifest on every rank."""
        self.writer.close()
        raw: bytes | None = None
        if self.writer.manifest is not None:  # the coordinator, which committed it
            raw = dump_manifest(self.writer.manifest)
            if self.retention is not None:
                try:
                    prune(self.r, self.retention, keep=_resumed.get(self.r.url, ()))
                except (CkptkitError, OSError) as err:  # the save is committed: pruning is retried after the next
                    log.warning("ckptkit.distributed: checkpoint %s committed in %s, but pruning failed: %s",
                                self.name, self.r.url, err)  # fmt: skip
        raw = _broadcast(raw, pg)
        return parse_manifest(raw, f"{self.r.url}/checkpoints/{self.name}.json")


class AsyncSave:
    """A sharded save in flight, returned by :func:`async_save` on every rank.

    The state was copied to host memory before :func:`async_save` returned; the shards are written and the
    manifest committed (by rank 0, after every rank finished) in the background. :meth:`wait` returns the
    committed manifest or raises the save's error (a ckptkit error; nothing committed); if nobody waits, the next
    :func:`save`, :func:`async_save`, :func:`load` or :func:`wait` of this process raises it, once.

    Attributes:
        name: the checkpoint being saved.
        url: its repository.
    """

    def __init__(self, name: str, url: str, future: concurrent.futures.Future[Manifest]) -> None:
        self.name = name
        self.url = url
        self.future = future
        self.reported = False

    def __repr__(self) -> str:
        return f"AsyncSave({self.name!r} in {self.url}, {'done' if self.done() else 'in flight'})"

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return self.future.done()

    def wait(self, timeout: float | None = None) -> Manifest:
        """Wait for the commit; the committed manifest (call it on every rank).

        Raises:
            DistributedCheckpointError, CheckpointExistsError, StorageError, UnsupportedStateError: the save failed
                on some rank (the same error on every rank); nothing was committed.
            StorageTimeoutError: still in flight after ``timeout`` seconds.
        """
        try:
            manifest = self.future.result(timeout)
        except concurrent.futures.TimeoutError as err:
            raise StorageTimeoutError(self.url, "async save", f"checkpoints/{self.name}.json", timeout or 0.0,
                                      "the save is still in flight; wait again") from err  # fmt: skip
        except BaseException:
            self.reported = True
            raise
        self.reported = True
        return manifest


_inflight: list[AsyncSave] = []
"""This process's sharded save in flight (one at a time)."""
_groups: dict[Any, Any] = {}
"""Per process group of the caller: the gloo group the background saves of :func:`async_save` use, so that their
collectives never interleave with the training step's on the caller's group."""
_resumed: dict[str, set[str]] = {}
"""Per repository URL: the checkpoints this process loaded (retention never prunes them)."""


def _settle() -> None:
    """Wait for the save in flight; raise its error if nobody has seen it yet (once)."""
    job = _inflight.pop() if _inflight else None
    if job is not None:
        try:
            job.future.result()
        except BaseException:
            if not job.reported:
                job.reported = True
                raise


def wait() -> Manifest | None:
    """Wait for this process's :func:`async_save` in flight; its committed manifest (None when there was none).
    Call it on every rank (e.g. before exiting).

    Raises:
        The save's error (a ckptkit error), once, when nobody has seen it yet.

    Example::

        ckptkit.distributed.wait()   # before dist.destroy_process_group()
    """
    job = _inflight[-1] if _inflight else None
    _settle()
    if job is None or not job.future.done() or job.future.exception() is not None:
        return None
    return job.future.result()


def _checkpoint_group(pg: ProcessGroup | None) -> ProcessGroup | None:
    """A gloo group of the same ranks as ``pg``, made once (by those ranks only), for background saves."""
    if not _distributed():
        return None
    key = pg if pg is not None else "default"
    if key not in _groups:
        ranks = dist.get_process_group_ranks(pg) if pg is not None else list(range(dist.get_world_size()))
        _groups[key] = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
    return _groups[key]


def async_save(
    repo: RepoLike,
    state: Mapping[str, object],
    name: str,
    *,
    progress: Progress | None = None,
    metrics: Mapping[str, float] | None = None,
    hparams: Mapping[str, Any] | None = None,
    rng: bool = True,
    retention: RetentionLike | None = None,
    process_group: ProcessGroup | None = None,
    object_size: int = DEFAULT_OBJECT_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> AsyncSave:
    """:func:`save`, in the background (through ``torch.distributed.checkpoint.async_save``); call it on every rank.

    Returns once this rank's state is copied to host memory, so training may go on at once: what is committed is
    the state as it was at the call. The shards are written and rank 0 commits after every rank finished (then
    applies ``retention``), on a gloo group of the same ranks made for background saves at the first call (so its
    collectives never interleave with the training step's). One save in flight per process: a call while one is
    still being written first waits for it, and raises its error instead of saving when it failed and nobody has
    seen the error yet (the same on every rank). The arguments are :func:`save`'s.

    Returns:
        An :class:`AsyncSave`: ``wait()`` gives the committed manifest or raises the save's ckptkit error.

    Raises:
        The previous save's error (see above), InvalidArgumentError, ArgumentTypeError. The errors of this save
        (CheckpointExistsError, UnsupportedStateError, StorageError, DistributedCheckpointError) are raised by
        ``wait()`` or the next call.

    Example::

        pending = ckptkit.distributed.async_save(url, state, f"step-{step:08d}", progress=Progress(global_step=step))
        ...                                   # the next training steps run while it is written
        manifest = pending.wait()             # or let the next save wait for it
    """
    _settle()
    job = _Job(repo, state, name, progress, metrics, hparams, rng, retention, process_group, object_size,
               storage_options)  # fmt: skip
    group = _checkpoint_group(process_group)
    done: concurrent.futures.Future[Manifest] = concurrent.futures.Future()

    def finished(f: concurrent.futures.Future[Any]) -> None:
        try:
            err = f.exception()
            if err is not None:
                job.writer.close()
                done.set_exception(_failure(err, "save", job.r.url, job.rank))
                return
            done.set_result(job.finish(group))
        except BaseException as exc:  # whatever it is, the caller gets it from wait()
            job.writer.close()
            done.set_exception(exc)

    try:
        with _quiet():
            upload = dcp_async_save(job.sd, storage_writer=job.writer, process_group=group,
                                    no_dist=not _distributed())  # fmt: skip
    except BaseException as err:
        job.writer.close()
        failure = _failure(err, "save", job.r.url, job.rank)
        if failure is err:
            raise
        raise failure from err
    future = upload if isinstance(upload, concurrent.futures.Future) else upload.upload_completion
    future.add_done_callback(finished)
    handle = AsyncSave(name, job.r.url, done)
    _inflight.append(handle)
    saved(models_of(state).values(), job.r.url, done)
    return handle


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
    _settle()
    r = open_repository(repo, storage_options)
    rank, world = _rank_and_world(process_group)
    found = _resolve_name(r, name, process_group)
    manifest = latest_manifest(r, found)
    saved_world = world_size_of(manifest)
    sd = _templates(state)
    md = metadata_from_json(manifest)  # validated before anything is loaded
    paths = entry_paths(md, manifest.name)
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
    except BaseException as err:
        failure = _failure(err, "load", r.url, rank)
        if failure is err:
            raise
        raise failure from err
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
            resplit = getattr(obj, "resplit", None)  # a ResumableLoader saved on another number of ranks
            if isinstance(resplit, tuple):
                issues.append(f"data position of {n!r} re-split from {resplit[0]} to {resplit[1]} rank(s) at sample "
                              f"{getattr(obj, 'samples_in_epoch', '?')} of epoch {getattr(obj, 'epoch', '?')}: the "
                              "rest of the epoch is shared out anew, no sample repeated or skipped, but each rank "
                              "sees other samples than it would have")  # fmt: skip
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
    # The models' weights now come from this checkpoint: the next save records a `resume` edge to it. (Its
    # components are the shards, not the model names, so ckptkit.engine.provenance.restored would match none.)
    parent = Parent(id=manifest.id, relation="resume", name=manifest.name)
    set_origin([o for n, o in models_of(state).items() if n not in absent],
               Origin("resume", (parent,), r.url, None, tuple(manifest.data)))  # fmt: skip
    _resumed.setdefault(r.url, set()).add(manifest.name)
    result.fidelity = Fidelity(issues)
    return result


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
