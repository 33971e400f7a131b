"""CheckpointManager: checkpointing inside any training loop in a handful of lines.

The manager keeps policy (when to save, what to keep, which lineage edge to record); retention, the async
writer, the run's lineage and continue planning live in their own modules beside this one, and the engine
(:mod:`ckptkit.engine`) does the reading and writing.

Example:
    >>> import torch, ckptkit
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> mgr = ckptkit.CheckpointManager("memory://doc-manager", {"model": model, "optimizer": opt},
    ...                                 every=2, retention=ckptkit.Retention(keep_last=2))
    >>> start = mgr.restore()            # None on a fresh run
    >>> for step in range(1, 7):
    ...     opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    ...     _ = mgr.save(step, metrics={"loss": 0.5})
    >>> [m.name for m in mgr.list()]
    ['step-00000004', 'step-00000006']
    >>> mgr.close()
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import logging
import os
import re
import string
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from ckptkit.engine.commit import commit_captured
from ckptkit.engine.gc import collect_garbage
from ckptkit.engine.manifests import RepoLike, latest_manifest, list_manifests, open_repository
from ckptkit.engine.provenance import (
    Edge,
    Origin,
    lineage_for,
    merge_segments,
    models_of,
    origin_of,
    relation_of,
    restored,
    saved,
    set_origin,
)
from ckptkit.engine.restore import RestoreResult, restore_state
from ckptkit.errors import (
    ArgumentTypeError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    ManagerClosedError,
    ManifestError,
    RepositoryBusyError,
)
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.hashing import check_name, file_hash
from ckptkit.interop.transfer import TransferPlan, transfer
from ckptkit.manager.continuing import (
    Position,
    SchedulePolicy,
    apply_changes,
    check_continue,
    hparams_diff,
    keep_hyperparameters,
    user_changes,
)
from ckptkit.manager.lineage import RunLineage, jsonable
from ckptkit.manager.retention import Retention
from ckptkit.manager.snapshot import Snapshotter
from ckptkit.manager.writer import ProcessWriter, Writer, track
from ckptkit.schema import DataSegment, Lineage, Manifest, Parent, Progress, parse_manifest
from ckptkit.state import LoadReport, capture, check_targets, is_data_loader
from ckptkit.state.files import check_optimizer_file, prepare_model_tensors, read_tensor_file, read_torch_file

if TYPE_CHECKING:
    from ckptkit.catalog.mlflow import MlflowCommitPublisher
    from ckptkit.catalog.publish import CommitIndexer

__all__ = ["CheckpointManager"]

log = logging.getLogger("ckptkit")


class CheckpointManager:
    """Saves and restores a training run's state in a repository, with retention.

    Args:
        url: repository URL (local path, ``s3://...``, any fsspec URL), or an open
            :class:`~ckptkit.storage.Repository` (to set S3 multipart ``part_size``/``max_concurrency``).
        state: components by name (models, optimizers, schedulers, scalers, Stateful objects, values).
        every: ``save(step)`` writes only when ``step`` is a multiple of this (``force=True`` always writes).
        retention: which of this run's checkpoints to keep after each save (``None`` keeps all). This run's
            checkpoints are those named by ``name_format`` (so a resumed run prunes what it wrote before a crash);
            other runs sharing the repository use another ``name_format`` (their names would collide otherwise),
            and their checkpoints, and any checkpoint another run started from (resumed, continued or transferred
            from), are never pruned.
        name_format: checkpoint names, formatted with ``step`` and ``epoch``.
        hparams: hyperparameters recorded in every checkpoint.
        rng: capture and restore process RNG.
        object_size: target size of stored objects.
        storage_options: passed to fsspec (credentials, endpoint); never stored.
        gc: delete objects that pruned checkpoints no longer reference.
        data: the dataset this run trains on, recorded in the data manifest with the samples consumed
            (from ``save(samples_seen=...)``).
        async_save: ``save`` returns once the state is copied to host memory (reused buffers, pinned for GPU
            tensors) and a background thread writes and commits; ``save`` then returns None and
            :meth:`wait` returns the committed manifest. At most one save is in flight; an error in the
            background is raised by the next ``save``, ``wait`` or ``close``; interpreter exit waits for the
            pending commit.
        writer_nice: with ``async_save``, how much lower the background writer's CPU priority is than the
            training loop's (a Linux nice increment, 0 to 19; 0 keeps them equal). The default, 10, lets training
            steps run at nearly full speed while the save is written in the CPU time they leave; when training
            keeps every core busy, the write takes longer (the next ``save`` waits for it). Linux only.
        writer: with ``async_save``, what writes in the background: ``"thread"`` (the default: a thread of this
            process) or ``"process"`` (a child process that maps the snapshot's shared memory and commits it:
            hashing and writing then never hold this process's GIL, so a busy machine slows training less; local
            repositories on Linux; the child starts at the first save, about a second, without blocking it).
        catalog: a catalog URL (a path, ``sqlite:///PATH``, ``postgresql://...``; see docs/catalog.md) to index each
            checkpoint in as it is committed, by a background thread: a save never waits for the catalog nor
            fails because of it (while it is unreachable, checkpoints wait in a bounded queue; what is left at
            :meth:`close` is logged and indexed by the next ``ckptkit catalog sync``). Needs
            ``ckptkit[catalog]``.
        mlflow: an MLflow 3 tracking server's URI (``http://host:5000``) to publish each checkpoint to as it is
            committed, as a logged model with its step, metrics, data and parent link (see docs/catalog.md), by a
            background thread that never fails or slows a save (while the server is unreachable, checkpoints wait
            in a bounded queue; what is left at :meth:`close` is logged with the commands that publish it).
            Needs ``ckptkit[mlflow]``.
        mlflow_experiment: the MLflow experiment to publish to (created when missing; default ``"ckptkit"``).
    """

    def __init__(
        self,
        url: RepoLike,
        state: Mapping[str, object],
        *,
        every: int | None = None,
        retention: Retention | None = None,
        name_format: str = "step-{step:08d}",
        hparams: Mapping[str, Any] | None = None,
        rng: bool = True,
        object_size: int = DEFAULT_OBJECT_SIZE,
        storage_options: dict[str, Any] | None = None,
        gc: bool = True,
        data: DataSegment | None = None,
        async_save: bool = False,
        writer_nice: int = 10,
        writer: str = "thread",
        catalog: str | None = None,
        mlflow: str | None = None,
        mlflow_experiment: str | None = None,
    ) -> None:
        check_targets(state)
        if not isinstance(writer_nice, int) or isinstance(writer_nice, bool) or not 0 <= writer_nice <= 19:
            raise InvalidArgumentError(f"writer_nice={writer_nice!r}: must be an integer from 0 (the training loop's "
                             "priority) to 19 (the lowest)")  # fmt: skip
        if every is not None and (not isinstance(every, int) or every < 1):
            raise InvalidArgumentError(f"every={every!r}: must be a positive integer (save every N steps) or None")
        if retention is not None and not isinstance(retention, Retention):
            raise ArgumentTypeError(f"retention must be a ckptkit.Retention, got {type(retention).__name__}")
        try:
            check_name(name_format.format(step=0, epoch=0))
        except (KeyError, IndexError, ValueError) as err:
            raise InvalidArgumentError(f"name_format={name_format!r} does not give a valid checkpoint name: {err}; "
                                       "use e.g. 'step-{step:08d}'") from err
        if object_size <= 0:
            raise InvalidArgumentError(f"object_size={object_size!r}: must be a positive number of bytes per object")
        self.repo = open_repository(url, storage_options)
        self.state = dict(state)
        self.every = every
        self.retention = retention
        self.name_format = name_format
        self.hparams = dict(hparams or {})
        self.rng = rng
        self.object_size = object_size
        self.gc = gc
        if data is not None and not isinstance(data, DataSegment):
            raise ArgumentTypeError(f"data must be a ckptkit.schema.DataSegment, got {type(data).__name__}")
        self.run = uuid.uuid4().hex
        self.restored_from: str | None = None
        self.segments: builtins.list[DataSegment] = [data] if data else []
        self._inherited: builtins.list[DataSegment] = []  # segments the weights saw before this run's restore
        self._segment_base = 0  # samples seen when the current data segment began
        self.async_save = bool(async_save)
        if writer not in ("thread", "process"):
            raise InvalidArgumentError(f"writer={writer!r}: must be 'thread' or 'process'")
        if writer == "process" and not (async_save and self.repo.local and hasattr(os, "memfd_create")):
            raise InvalidArgumentError(f"writer='process' needs async_save=True, a local repository and Linux (got "
                                       f"async_save={async_save!r}, {self.repo.url}); use writer='thread'")  # fmt: skip
        self.writer = writer
        self._snapshots = Snapshotter(shared=writer == "process") if async_save else None
        self.writer_nice = writer_nice
        self._writer: Writer | None = None
        self._inflight: concurrent.futures.Future[Manifest] | None = None
        self._last: Manifest | None = None
        self._lineage = RunLineage(self.run)
        self._run_starts: dict[str, set[str]] = {}  # other runs' start points, for prune
        self._own = _name_pattern(name_format)  # the names this run's checkpoints have
        self._closed = False
        self._catalog: CommitIndexer | None = None
        if catalog is not None:  # imported here: a manager without a catalog never imports SQLAlchemy
            from ckptkit.catalog.publish import CommitIndexer

            self._catalog = CommitIndexer(catalog, self.repo)
        self._mlflow: MlflowCommitPublisher | None = None
        if mlflow_experiment is not None and mlflow is None:
            raise InvalidArgumentError(f"mlflow_experiment={mlflow_experiment!r} without mlflow=URI: pass the "
                                       "tracking server too, e.g. mlflow='http://127.0.0.1:5000'")  # fmt: skip
        if mlflow is not None:  # imported here: a manager without mlflow= never imports the MLflow client
            from ckptkit.catalog.mlflow import DEFAULT_EXPERIMENT, MlflowCommitPublisher

            self._mlflow = MlflowCommitPublisher(mlflow, self.repo, experiment=mlflow_experiment or DEFAULT_EXPERIMENT)

    # --- reading -------------------------------------------------------------------------------------------

    def list(self) -> builtins.list[Manifest]:
        """Committed checkpoints, oldest first."""
        return list_manifests(self.repo)

    def latest(self) -> Manifest | None:
        """The most recent checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def best(self) -> Manifest | None:
        """The best checkpoint by the retention metric, or None."""
        if self.retention is None or not self.retention.metric:
            raise InvalidArgumentError("best() needs CheckpointManager(retention=Retention(keep_best=K, metric=...))")
        return self.retention.best(self.list())

    def restore(
        self, name: str | None = None, *, which: Literal["latest", "best"] = "latest", strict: bool = True
    ) -> RestoreResult | None:
        """Restore a checkpoint into the managed objects.

        With ``name=None`` it restores the latest (or, with ``which="best"``, the best) checkpoint, and returns
        ``None`` only when the repository holds no checkpoint, so the same line starts a fresh run or resumes one.
        A damaged latest checkpoint is passed over for the newest one that restores (``result.skipped`` says
        why). The next save records lineage ``resume``.

        Raises:
            NoRestorableCheckpointError: checkpoints exist and none can be restored (each one tried is listed
                with why): a run never starts afresh silently.
        """
        self._check_open()
        if name is None:
            if not self.repo.list():
                return None  # an empty repository: a fresh run
            if which == "best":
                best = self.best()
                name = best.name if best is not None else None
        # Without a name, restore_state tries the newest first and falls back past a damaged one; when checkpoints
        # exist and none can be restored it raises NoRestorableCheckpointError (never a silent fresh start).
        result = restore_state(self.repo, self.state, name, strict=strict, rng=self.rng)
        m = result.manifest
        self.restored_from = m.name
        self._lineage.set("resume", [Parent(id=m.id, relation="resume", name=m.name)])
        restored(self.state, m, self.repo.url, "resume", by=self.run)
        self._inherited = []
        if m.data:
            self.segments = list(m.data)
            self._segment_base = m.progress.samples_seen - m.data[-1].samples_consumed
        log.info("restored %s (step %d) from %s: %s", m.name, m.progress.global_step, self.repo.url, result.fidelity)
        return result

    def continue_from(
        self,
        name: str | None = None,
        *,
        schedule: SchedulePolicy | None = None,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        lr: float | None = None,
        optimizer_hparams: Mapping[str, Any] | None = None,
        hparams: Mapping[str, Any] | None = None,
        new_data: DataSegment | None = None,
        changes: Mapping[str, Any] | None = None,
        position: Position = "step",
        rng: bool = False,
        strict: bool = True,
    ) -> RestoreResult:
        """Continue training from a checkpoint (the latest when ``name`` is None), with changes made explicit.

        Restores the checkpoint, then applies the changes and records them: the next save's lineage edge is
        ``continue``, with what changed. New data of the same problem: ``new_data=DataSegment(...)``; data-loader
        components then start at the beginning of the new data instead of restoring their position, and the
        checkpoints list the new segment after the ones the weights already saw. A changed batch size: build the
        loader with the new size; its position is kept in samples. New optimizer hyperparameters: ``lr`` and
        ``optimizer_hparams`` (applied to every param group).

        Args:
            schedule: what happens to the LR scheduler(s), any torch scheduler or a ckptkit ``PlannedLR``:
                ``"keep"`` (the default): restored as saved; a checkpoint without scheduler state (bare files,
                imports) moves the freshly built scheduler to the checkpoint's ``position``, so its LR equals
                that of a scheduler that stepped the whole way. ``"restart"``: the scheduler and optimizer
                hyperparameters you built for this run are kept, only the optimizer's state tensors are
                restored (a ``PlannedLR`` given ``total_steps`` appends a fresh warmup and decay instead).
                ``"extend"``: restored and stretched to ``total_steps`` with no LR jump (``PlannedLR``,
                ``CosineAnnealingLR``, ...). ``"constant"``: restored, then the LR in effect (or ``lr``) is held.
            total_steps: the new end of the schedule, in scheduler steps (``extend``; ``PlannedLR`` re-plans).
            warmup_steps: the warmup of a ``PlannedLR`` restart.
            position: what a scheduler with no saved state counts: ``"step"`` (optimizer steps, the checkpoint's
                ``global_step``) or ``"epoch"`` (``progress.epoch``).
            hparams: the run's new hyperparameters, recorded with their diff against the checkpoint's.
            changes: free-form notes recorded in the edge beside what ckptkit applied (``{"reason": ...}``).
            rng: also restore process RNG state (off by default: a continued run is a new run).

        Raises:
            CheckpointNotFoundError: nothing to continue from.
            InvalidArgumentError: options that do not fit together or the state (checked before anything is
                restored).
        """
        self._check_open()
        plan = check_continue(self.state, schedule, total_steps, warmup_steps, lr, new_data, position)
        if changes is not None:
            user_changes({}, changes, self.state)  # checked before anything is restored
        if name is None:
            latest = self.latest()
            if latest is None:
                raise CheckpointNotFoundError(self.repo.url, None)
            name = latest.name
        saved_m = latest_manifest(self.repo, name)
        plan.check_against(saved_m)  # a total behind the saved position is refused before anything is restored
        fresh = {n for n in plan.schedulers if plan.fresh(n, saved_m)}  # left as built: not restored
        targets = {n: o for n, o in self.state.items()
                   if n not in fresh and not (new_data is not None and is_data_loader(o))}  # fmt: skip
        built = keep_hyperparameters(self.state)
        result = restore_state(self.repo, targets, name, strict=strict, rng=rng)
        m = result.manifest
        if plan.schedule == "restart" and not plan.replan:  # as built for this run; the state tensors restored
            for opt, groups in built:
                for g, hp in zip(opt.param_groups, groups, strict=True):
                    g.update(hp)
        for n in self.state:
            if n not in targets:
                result.reports.pop(n, None)
        found = apply_changes(self.state, m, plan, built=built, warmup_steps=warmup_steps, lr=lr,
                              optimizer_hparams=optimizer_hparams, new_data=new_data)  # fmt: skip
        if hparams is not None:
            found["hparams"] = hparams_diff(m.hparams, hparams)
            self.hparams = dict(hparams)
        else:
            self.hparams = {**m.hparams, **self.hparams}
        recorded = jsonable(user_changes(found, changes, self.state))
        self.segments = list(m.data)
        self._inherited = []
        if new_data is not None:
            self.segments.append(new_data)
            self._segment_base = m.progress.samples_seen
        elif m.data:
            self._segment_base = m.progress.samples_seen - m.data[-1].samples_consumed
        self.restored_from = m.name
        self._lineage.set("continue", [Parent(id=m.id, relation="continue", name=m.name, changes=recorded)])
        restored(self.state, m, self.repo.url, "continue", recorded, by=self.run)
        log.info("continuing from %s (step %d): %s", m.name, m.progress.global_step, found or "no changes")
        return result

    def start_from_files(
        self, weights: str, optimizer: str | None = None, *, model: str | None = None, strict: bool = True
    ) -> LoadReport:
        """Start from bare files another tool wrote: a weights file and, optionally, an optimizer file.

        ``weights`` is a ``.safetensors`` file or a torch file of tensors (read with
        ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped).
        ``optimizer`` is a torch file of an optimizer ``state_dict()`` for the same parameters in the same order.
        Nothing is unpickled beyond tensors and plain containers. Both files are read and checked against the
        live objects before either is loaded, so a refused file leaves the model and optimizer as they were. The
        next save records lineage ``import``. To make a checkpoint of the files (with their step and epoch) that
        ``continue_from`` can use, see :func:`ckptkit.import_files`.
        """
        self._check_open()
        comp, target = self._model("start_from_files", model)
        tensors = read_tensor_file(weights)
        opt_target: torch.optim.Optimizer | None = None
        osd: dict[str, Any] | None = None
        if optimizer is not None:
            opts = [o for o in self.state.values() if isinstance(o, torch.optim.Optimizer)]
            if len(opts) != 1:
                raise InvalidArgumentError(f"start_from_files(optimizer=...) needs one optimizer component, the "
                                           f"state has {len(opts)}")
            opt_target = opts[0]
            osd = check_optimizer_file(optimizer, read_torch_file(optimizer), opt_target)
        report, load = prepare_model_tensors(comp, target, tensors, strict)  # checks keys and shapes; loads nothing
        load()
        source: dict[str, Any] = {"weights": weights, "weights_blake3": file_hash(weights)}
        if opt_target is not None and osd is not None and optimizer is not None:
            opt_target.load_state_dict(osd)
            source.update(optimizer=optimizer, optimizer_blake3=file_hash(optimizer))
        self._lineage.set("import", [], source)
        set_origin(models_of(self.state).values(), Origin("import", source=source, by=self.run))
        self._inherited = []
        return report

    def transfer_from(
        self,
        source: str,
        *,
        name: str | None = None,
        component: str | None = None,
        model: str | None = None,
        include: builtins.list[str] | None = None,
        exclude: builtins.list[str] | None = None,
        key_map: Mapping[str, str] | None = None,
        reset_heads: bool = False,
        strict: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> TransferPlan:
        """Load what fits from another checkpoint (or exported folder) into a managed model; see
        :func:`ckptkit.interop.transfer`. The next save's lineage is ``transfer``, with the per-tensor plan; several
        calls before a save (the branches of a fusion model) become several parents."""
        self._check_open()
        _, target = self._model("transfer_from", model)
        plan = transfer(
            source, target, name=name, component=component, include=include, exclude=exclude,
            key_map=key_map, reset_heads=reset_heads, strict=strict, storage_options=storage_options,
        )  # fmt: skip
        for w in plan.warnings:
            log.warning("%s", w)
        return plan  # transfer() recorded the edge on the model: the next save writes it (see _foreign_edge)

    def _model(self, verb: str, name: str | None) -> tuple[str, torch.nn.Module]:
        """The model component ``name``, or the only one."""
        models = {n: o for n, o in self.state.items() if isinstance(o, torch.nn.Module)}
        if name is None and len(models) != 1:
            raise InvalidArgumentError(f"{verb}: name the model component (model=...), the state has {list(models)}")
        comp = name or next(iter(models))
        if comp not in models:
            raise InvalidArgumentError(f"{verb}: {comp!r} is not a model component of this manager ({list(models)})")
        return comp, models[comp]

    # --- writing -------------------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether ``save(step)`` would write a checkpoint."""
        return self.every is None or step % self.every == 0

    def save(
        self,
        step: int,
        *,
        epoch: int = 0,
        step_in_epoch: int = 0,
        samples_seen: int = 0,
        metrics: Mapping[str, float] | None = None,
        data: builtins.list[DataSegment] | None = None,
        hparams: Mapping[str, Any] | None = None,
        parents: builtins.list[Parent] | None = None,
        force: bool = False,
        name: str | None = None,
    ) -> Manifest | None:
        """Save a checkpoint if ``step`` is due (or ``force``); then apply retention.

        Args:
            data: data segments read since the last save, listed after those the weights already saw.
            hparams: recorded in this checkpoint on top of the manager's.
            parents: the lineage edge's parents, overriding the one the manager and the models' origins give.

        The lineage edge follows the models: after this manager's ``restore``/``continue_from``/
        ``transfer_from``/``start_from_files``, or ``ckptkit.restore``/``ckptkit.transfer`` into the same model
        objects (also before this manager was created), the save records where the weights came from.

        Returns the committed manifest, or None when the step was not due. With ``async_save=True`` it returns
        None as soon as the state is copied to host memory; :meth:`wait` returns the manifest once committed.
        """
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
        if not force and not self.should_save(step):
            return None
        name = check_name(name or self.name_format.format(step=step, epoch=epoch))
        self.wait()  # one save in flight: its lineage is this one's parent, and its buffers are reused
        # Decided here, on the caller's thread, never by the writer.
        edge = self._foreign_edge()
        if parents is not None:
            lineage = Lineage(relation=relation_of(parents), parents=list(parents), run=self.run)
        elif edge is not None:
            lineage = edge.lineage
        else:
            lineage = self._lineage.edge(self._last)
        if edge is not None:
            self._inherited = merge_segments(self._inherited, edge.data)
        if self.segments:
            consumed = max(0, samples_seen - self._segment_base)
            self.segments[-1] = self.segments[-1].model_copy(update={"samples_consumed": consumed})
        segments = merge_segments(merge_segments(self._inherited, self.segments), data or [])
        progress = Progress(epoch=epoch, global_step=step, step_in_epoch=step_in_epoch, samples_seen=samples_seen)
        extra = dict(hparams or {})
        captured = capture(self.state, rng=self.rng)
        self._lineage.saved()
        models = models_of(self.state).values()
        if self._snapshots is None:
            manifest = self._commit(captured, name, progress, metrics, segments, lineage, extra)
            saved(models, self.repo.url, manifest, by=self.run)
            return manifest
        snapshot = self._snapshots.take(captured)
        metrics = dict(metrics or {})
        if self._writer is None:
            self._writer = (ProcessWriter(self.writer_nice, self.repo.url, self._snapshots)
                            if self.writer == "process" else Writer(self.writer_nice))  # fmt: skip
            track(self)
        self._inflight = self._writer.submit(self._commit, snapshot, name, progress, metrics, segments, lineage, extra)
        saved(models, self.repo.url, self._inflight, by=self.run)
        return None

    def _foreign_edge(self) -> Edge | None:
        """The edge the models' origins give, when one of them was set outside this manager since its last save
        (``ckptkit.restore``, ``ckptkit.transfer``, another manager, a save elsewhere); None otherwise."""
        for model in models_of(self.state).values():
            o = origin_of(model)
            if o is not None and o.by != self.run and o.relation != "init":
                return lineage_for(self.state, self.repo.url, self.run)
        return None

    def _commit(
        self,
        captured: builtins.list[Any],
        name: str,
        progress: Progress,
        metrics: Mapping[str, float] | None,
        data: builtins.list[DataSegment] | None,
        lineage: Lineage,
        hparams: Mapping[str, Any] | None = None,
    ) -> Manifest:
        commit = self._writer.commit if isinstance(self._writer, ProcessWriter) else commit_captured
        manifest = commit(self.repo, captured, name, progress=progress, metrics=metrics,
                                   hparams={**self.hparams, **(hparams or {})}, data=data, lineage=lineage,
                                   object_size=self.object_size)  # fmt: skip
        self._last = manifest
        retired = self.prune() if self.retention is not None else []
        if self._catalog is not None:
            self._catalog.submit(manifest, retired=retired)  # returns at once; indexed in the background
        if self._mlflow is not None:
            self._mlflow.submit(manifest)  # returns at once; published in the background
        return manifest

    def wait(self) -> Manifest | None:
        """Wait for the save in flight (async mode) and return the last committed manifest.

        Raises whatever the background save raised, once: a failed save is never lost silently.
        """
        future, self._inflight = self._inflight, None
        if future is not None:
            future.result()
        return self._last

    def prune(self) -> builtins.list[str]:
        """Apply retention to this run's checkpoints now; return the names deleted.

        Only this run's checkpoints are considered: those whose names ``name_format`` makes (whichever process of
        the run wrote them). Never deletes this run's newest checkpoint, the one it restored from, or a checkpoint
        another run in the repository started from (resumed, continued or transferred from).
        """
        if self.retention is None:
            return []
        found = self.list()
        mine = [m for m in found if self._own.fullmatch(m.name)]
        if not mine:
            return []
        needed = self._needed_by_other_runs(found)
        keep = self.retention.keep(mine) | {mine[-1].name}
        if self.restored_from:
            keep.add(self.restored_from)
        deleted = []
        for m in mine:
            if m.name not in keep and m.id not in needed:
                try:
                    self.repo.retire(m.name, m.id)  # moved to lineage/ (no new data: works on a full disk)
                    deleted.append(m.name)
                except CheckpointNotFoundError:
                    continue  # already gone (another process pruned it)
        if deleted and self.gc:
            # Another process's gc running is no failure of this save: it, or the next gc, collects this garbage.
            with contextlib.suppress(RepositoryBusyError):
                collect_garbage(self.repo)
        return deleted

    def _needed_by_other_runs(self, found: builtins.list[Manifest]) -> set[str]:
        """Ids of checkpoints that other runs in the repository started from (resumed, continued, transferred):
        the parents of their checkpoints, and of the first checkpoint of each run, found through the archived
        manifests of its pruned `train` checkpoints (each run's start is looked up once per manager)."""
        others = [m for m in found if not self._own.fullmatch(m.name)]
        needed = {p.id for m in others for p in m.lineage.parents}
        oldest: dict[str, Manifest] = {}
        for m in others:
            if m.lineage.run:
                oldest.setdefault(m.lineage.run, m)
        for run, m in oldest.items():
            if run not in self._run_starts:
                self._run_starts[run] = self._start_of(m)
            needed |= self._run_starts[run]
        return needed

    def _start_of(self, m: Manifest) -> set[str]:
        """The parents of the first checkpoint of ``m``'s run (walking archived `train` parents back)."""
        seen: set[str] = set()
        while m.lineage.relation == "train" and m.lineage.parents and m.id not in seen:
            seen.add(m.id)
            raw = self.repo.read_archived(m.lineage.parents[0].id)
            if raw is None:
                return set()  # the parent is still committed (then it is in `found`) or gone
            try:
                m = parse_manifest(raw, f"{self.repo.url}/lineage/{m.lineage.parents[0].id}.json")
            except ManifestError:
                return set()
        return {p.id for p in m.lineage.parents}

    def close(self) -> None:
        """Wait for a pending async save (raising its error, if any), then refuse further saves.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.stop()
                self._writer = None
            if self._catalog is not None:
                self._catalog.close()  # indexes what is queued (10 s at most), logs what it leaves to sync
            if self._mlflow is not None:
                self._mlflow.close()  # publishes what is queued (10 s at most), logs what it leaves
            track(self, live=False)

    def __del__(self) -> None:
        if getattr(self, "_inflight", None) is not None and not self._inflight.done():  # type: ignore[union-attr]
            log.warning("CheckpointManager for %s dropped with a save in flight; it still commits", self.repo.url)

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError("this CheckpointManager is closed; create a new one")

    def pending(self) -> bool:
        """Whether an async save is still being written."""
        return self._inflight is not None and not self._inflight.done()

    def describe(self) -> str:
        """Where this manager saves (for log messages)."""
        return self.repo.url

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _name_pattern(name_format: str) -> re.Pattern[str]:
    """A pattern that matches exactly the names ``name_format`` makes (its fields become digit runs)."""
    parts = []
    for literal, field_name, _spec, _conv in string.Formatter().parse(name_format):
        parts.append(re.escape(literal))
        if field_name is not None:
            parts.append("[0-9]+")
    return re.compile("".join(parts))
