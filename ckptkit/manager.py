"""CheckpointManager: checkpointing inside any training loop in a handful of lines.

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
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ckptkit.api import RestoreResult, checkpoints, commit_captured, gc, open_repository, restore
from ckptkit.errors import CheckpointNotFoundError, CkptkitError
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.schema import DataSegment, Lineage, Manifest, Parent, Progress, Relation
from ckptkit.state import capture, check_targets
from ckptkit.storage import check_name

log = logging.getLogger("ckptkit")


@dataclass(frozen=True)
class Retention:
    """Which checkpoints to keep. Rules compose: a checkpoint survives if any rule keeps it.

    The newest checkpoint and the one the run restored from are always kept.

    Args:
        keep_last: the N most recent checkpoints.
        keep_best: the K best by ``metric`` (``mode="min"`` for a loss, ``"max"`` for an accuracy).
        keep_every: checkpoints whose global step is a multiple of N (milestones).

    Example:
        >>> Retention(keep_last=3, keep_best=2, metric="val_loss", mode="min", keep_every=1000)
        Retention(keep_last=3, keep_best=2, metric='val_loss', mode='min', keep_every=1000)
    """

    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: Literal["min", "max"] = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for field_name in ("keep_last", "keep_best", "keep_every"):
            v = getattr(self, field_name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Retention({field_name}={v!r}): must be a positive integer or None")
        if self.keep_best is not None and not self.metric:
            raise ValueError("Retention(keep_best=...) needs metric='<name of a metric passed to save()>'")
        if self.metric is not None and self.keep_best is None:
            raise ValueError(f"Retention(metric={self.metric!r}) has no effect without keep_best=K")
        if self.mode not in ("min", "max"):
            raise ValueError(f"Retention(mode={self.mode!r}): use 'min' (lower is better) or 'max'")
        if self.keep_last is None and self.keep_best is None and self.keep_every is None:
            raise ValueError("Retention() keeps nothing extra: set keep_last, keep_best or keep_every")

    def keep(self, manifests: list[Manifest]) -> set[str]:
        """Names of the checkpoints these rules keep (``manifests`` oldest first)."""
        kept: set[str] = set()
        if self.keep_last:
            kept.update(m.name for m in manifests[-self.keep_last :])
        if self.keep_every:
            kept.update(m.name for m in manifests if m.progress.global_step % self.keep_every == 0)
        if self.keep_best and self.metric:
            scored = [m for m in manifests if _score(m, self.metric) is not None]
            sign = 1.0 if self.mode == "min" else -1.0
            scored.sort(key=lambda m: (sign * (_score(m, self.metric) or 0.0), -m.progress.global_step))
            kept.update(m.name for m in scored[: self.keep_best])
        return kept

    def best(self, manifests: list[Manifest]) -> Manifest | None:
        """The best checkpoint by ``metric`` (None without a metric rule or any scored checkpoint)."""
        if not self.metric:
            return None
        scored = [m for m in manifests if _score(m, self.metric) is not None]
        if not scored:
            return None
        sign = 1.0 if self.mode == "min" else -1.0
        return min(scored, key=lambda m: (sign * (_score(m, self.metric) or 0.0), -m.progress.global_step))


def _score(m: Manifest, metric: str | None) -> float | None:
    v = m.metrics.get(metric or "")
    return None if v is None or math.isnan(v) else v


class CheckpointManager:
    """Saves and restores a training run's state in a repository, with retention.

    Args:
        url: repository URL (local path, ``s3://...``, any fsspec URL).
        state: components by name (models, optimizers, schedulers, scalers, Stateful objects, values).
        every: ``save(step)`` writes only when ``step`` is a multiple of this (``force=True`` always writes).
        retention: which checkpoints to keep after each save (``None`` keeps all).
        name_format: checkpoint names, formatted with ``step`` and ``epoch``.
        hparams: hyperparameters recorded in every checkpoint.
        rng: capture and restore process RNG.
        object_size: target size of stored objects.
        storage_options: passed to fsspec (credentials, endpoint); never stored.
        gc: delete objects that pruned checkpoints no longer reference.
    """

    def __init__(
        self,
        url: str,
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
    ) -> None:
        check_targets(state)
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every={every!r}: must be a positive integer (save every N steps) or None")
        if retention is not None and not isinstance(retention, Retention):
            raise TypeError(f"retention must be a ckptkit.Retention, got {type(retention).__name__}")
        try:
            check_name(name_format.format(step=0, epoch=0))
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"name_format={name_format!r} does not give a valid checkpoint name: {err}") from err
        if object_size <= 0:
            raise ValueError(f"object_size must be positive, got {object_size}")
        self.repo = open_repository(url, storage_options)
        self.state = dict(state)
        self.every = every
        self.retention = retention
        self.name_format = name_format
        self.hparams = dict(hparams or {})
        self.rng = rng
        self.object_size = object_size
        self.gc = gc
        self.run = uuid.uuid4().hex
        self.restored_from: str | None = None
        self._parent: Parent | None = None
        self._closed = False

    # --- reading -------------------------------------------------------------------------------------------

    def list(self) -> builtins.list[Manifest]:
        """Committed checkpoints, oldest first."""
        return checkpoints(self.repo)

    def latest(self) -> Manifest | None:
        """The most recent checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def best(self) -> Manifest | None:
        """The best checkpoint by the retention metric, or None."""
        if self.retention is None or not self.retention.metric:
            raise CkptkitError("best() needs CheckpointManager(retention=Retention(keep_best=K, metric=...))")
        return self.retention.best(self.list())

    def restore(
        self, name: str | None = None, *, which: Literal["latest", "best"] = "latest", strict: bool = True
    ) -> RestoreResult | None:
        """Restore a checkpoint into the managed objects.

        With ``name=None`` it restores the latest (or, with ``which="best"``, the best) checkpoint, and returns
        ``None`` when the repository has none, so the same line starts a fresh run or resumes one.
        """
        self._check_open()
        if name is None:
            target = self.best() if which == "best" else self.latest()
            if target is None:
                return None
            name = target.name
        result = restore(self.repo, self.state, name, strict=strict, rng=self.rng)
        self.restored_from = result.manifest.name
        self._parent = Parent(id=result.manifest.id, relation="resume", name=result.manifest.name)
        log.info("restored %s (step %d) from %s", name, result.progress.global_step, self.repo.url)
        return result

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
        force: bool = False,
        name: str | None = None,
    ) -> Manifest | None:
        """Save a checkpoint if ``step`` is due (or ``force``); then apply retention.

        Returns the committed manifest, or None when the step was not due.
        """
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if not force and not self.should_save(step):
            return None
        name = check_name(name or self.name_format.format(step=step, epoch=epoch))
        relation: Relation = self._parent.relation if self._parent else "init"
        lineage = Lineage(relation=relation, parents=[self._parent] if self._parent else [], run=self.run)
        manifest = commit_captured(
            self.repo,
            capture(self.state, rng=self.rng),
            name,
            progress=Progress(epoch=epoch, global_step=step, step_in_epoch=step_in_epoch, samples_seen=samples_seen),
            metrics=metrics,
            hparams=self.hparams,
            data=data,
            lineage=lineage,
            object_size=self.object_size,
        )
        self._parent = Parent(id=manifest.id, relation="train", name=manifest.name)
        if self.retention is not None:
            self.prune()
        return manifest

    def prune(self) -> builtins.list[str]:
        """Apply retention now; return the names deleted. Never deletes the newest checkpoint or the one this
        run restored from."""
        if self.retention is None:
            return []
        found = self.list()
        if not found:
            return []
        keep = self.retention.keep(found) | {found[-1].name}
        if self.restored_from:
            keep.add(self.restored_from)
        deleted = []
        for m in found:
            if m.name not in keep:
                try:
                    self.repo.delete(m.name)
                    deleted.append(m.name)
                except CheckpointNotFoundError:
                    continue  # already gone (another process pruned it)
        if deleted and self.gc:
            gc(self.repo)
        return deleted

    def close(self) -> None:
        """Finish: after this the manager refuses to save. Safe to call twice."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise CkptkitError("this CheckpointManager is closed; create a new one")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
