"""ckptkit inside HF ``transformers.Trainer``: a callback that saves the whole training state through a
:class:`~ckptkit.CheckpointManager` (any fsspec URL, hashes, dedup, lineage, retention), and resumes from it.

Example::

    from ckptkit.integrations.hf_trainer import CkptkitCallback

    cb = CkptkitCallback("s3://bucket/run-7", every=200, retention=ckptkit.Retention(keep_last=3))
    trainer = Trainer(model, TrainingArguments(..., save_strategy="no"), train_dataset=ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_from())   # None on a fresh run: starts from scratch

``resume_from`` writes the latest ckptkit checkpoint as a Trainer ``checkpoint-N`` folder
(:func:`~ckptkit.interop.export_hf_trainer.export_hf_trainer`) and returns its path, so Trainer resumes through its
own code: it loads the weights, optimizer, scheduler and scaler, skips the batches already trained on and restores
the RNG streams at the point it chose for that. Restoring the objects directly would not skip the batches (Trainer
decides the data position from ``resume_from_checkpoint`` alone), so this is the resume that is exact.

This module imports ``transformers``; ``import ckptkit`` does not import this module.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptkit.engine.manifests import RepoLike, read_manifest, scan
from ckptkit.engine.provenance import restored
from ckptkit.engine.restore import Fidelity
from ckptkit.errors import (
    CorruptObjectError,
    DestinationNotEmptyError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ManifestError,
    NoRestorableCheckpointError,
)
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.interop.export_hf_trainer import TRAINER_STATE, export_hf_trainer
from ckptkit.manager import CheckpointManager, Retention
from ckptkit.schema import Manifest

__all__ = ["CkptkitCallback"]

log = logging.getLogger("ckptkit")


class _TrainerProgress:
    """Trainer's ``TrainerState`` as a Stateful component: global step, epoch, log history, best metric. It carries
    the data position (Trainer skips ``global_step`` optimizer steps' worth of batches on resume)."""

    data_loader = True  # ckptkit's fidelity check: the data position is saved

    def __init__(self) -> None:
        self.state: TrainerState | None = None
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.state is None:
            raise InvalidArgumentError("no Trainer state to save yet: CkptkitCallback saves from inside Trainer.train")
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = dict(state_dict)


def _inner(obj: Any, attr: str, cls: type) -> Any:
    """The torch object inside Accelerate's wrapper (``AcceleratedOptimizer.optimizer``, ``.scheduler``)."""
    inner = getattr(obj, attr, None)
    return inner if isinstance(inner, cls) else obj


class CkptkitCallback(TrainerCallback):
    """Saves the Trainer's model, optimizer, LR scheduler, grad scaler (when any), process RNG and
    ``TrainerState`` (global step, epoch, the data position) to a ckptkit repository.

    It saves every ``every`` optimizer steps, and (``on_trainer_save=True``) whenever Trainer itself saves, once per
    step either way; ``save_strategy="no"`` with ``every=N`` needs no Trainer checkpoint folders at all. The manager
    (:attr:`manager`) is built here, so bad options fail now rather than at the first save.

    Args:
        url: the repository (local path, ``s3://...``, any fsspec URL, or an open Repository).
        every: save every this many optimizer steps (None: only when Trainer saves).
        on_trainer_save: also save when Trainer saves (its ``save_strategy``).
        retention: which of this run's checkpoints to keep (never the one the run resumed from).
        name_format: checkpoint names, formatted with ``step`` and ``epoch``.
        hparams: recorded in every checkpoint.
        async_save: write in a background thread (see :class:`~ckptkit.CheckpointManager`).
        object_size: target size of stored objects.
        storage_options: passed to fsspec (credentials, endpoint); never stored.

    Raises:
        InvalidArgumentError: an option out of range (``every``, ``name_format`` ...).

    Example::

        cb = CkptkitCallback("./ckpts", every=50)
        trainer = Trainer(model, args, train_dataset=ds, callbacks=[cb])
        trainer.train(resume_from_checkpoint=cb.resume_from())
    """

    def __init__(
        self,
        url: RepoLike,
        *,
        every: int | None = None,
        on_trainer_save: bool = True,
        retention: Retention | None = None,
        name_format: str = "step-{step:08d}",
        hparams: Mapping[str, Any] | None = None,
        async_save: bool = False,
        object_size: int = DEFAULT_OBJECT_SIZE,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if every is None and not on_trainer_save:
            raise InvalidArgumentError("CkptkitCallback(every=None, on_trainer_save=False) would never save: pass "
                                       "every=N (save every N optimizer steps) or on_trainer_save=True")  # fmt: skip
        self.manager = CheckpointManager(url, {}, every=every, retention=retention, name_format=name_format,
                                         hparams=hparams, async_save=async_save, object_size=object_size,
                                         storage_options=storage_options)  # fmt: skip
        self.on_trainer_save = bool(on_trainer_save)
        self.fidelity: Fidelity | None = None
        """After :meth:`resume_from`: what the resume does not restore exactly (``.exact``, ``.issues``)."""
        self._progress = _TrainerProgress()
        self._resume: Manifest | None = None
        self._resume_dir: str | None = None  # a temporary folder of ours, removed at the end of training
        self._last_step = -1

    # --- resuming ----------------------------------------------------------------------------------------------

    def resume_from(self, name: str | None = None, *, dest: str | None = None) -> str | None:
        """Write checkpoint ``name`` (the latest that reads back intact by default) as a Trainer checkpoint folder
        and return its path for ``trainer.train(resume_from_checkpoint=...)``; None when the repository is empty
        (a fresh run). The run's next save records lineage ``resume`` with that checkpoint as parent, and retention
        never deletes it. :attr:`fidelity` says what is not restored exactly.

        Args:
            name: the checkpoint (default: the newest; a damaged one is passed over for the one before).
            dest: the folder to write (new or empty); default a temporary folder, removed when training ends.

        Raises:
            NoRestorableCheckpointError: checkpoints exist and none can be read back intact.
            DestinationNotEmptyError: ``dest`` holds files.
            InvalidArgumentError: the checkpoint lacks state Trainer needs (e.g. no optimizer).

        Example::

            trainer.train(resume_from_checkpoint=cb.resume_from())
        """
        r = self.manager.repo
        skipped: list[tuple[str, str]] = []
        if name is not None:
            candidates = [read_manifest(r, name)]
        else:
            found, skipped = scan(r)
            if not found and not skipped:
                return None
            candidates = found[::-1]
        folder = dest if dest is not None else tempfile.mkdtemp(prefix="ckptkit-resume-")
        if os.path.exists(folder) and os.listdir(folder):
            raise DestinationNotEmptyError(folder)
        for m in candidates:
            issues: list[str] = []
            try:
                export_hf_trainer(r, m, folder, None, issues)
            except (CorruptObjectError, IncompleteCheckpointError, ManifestError) as err:
                if name is not None:
                    self._discard(folder, dest)
                    raise
                log.warning("resume: skipping %s: %s", m.name, err)
                skipped.append((m.name, str(err)))
                for f in os.listdir(folder):
                    os.remove(os.path.join(folder, f))
                continue
            except BaseException:  # a checkpoint Trainer cannot resume from (the error says why)
                self._discard(folder, dest)
                raise
            if skipped:
                issues.append(f"fell back to {m.name}; skipped {', '.join(n for n, _ in skipped)}")
            self._resume, self.fidelity = m, Fidelity(issues)
            self._resume_dir = None if dest is not None else folder
            self.manager.restored_from = m.name  # retention keeps it
            log.info("resume from %s (step %d) via %s: %s", m.name, m.progress.global_step, folder, self.fidelity)
            return folder
        self._discard(folder, dest)
        raise NoRestorableCheckpointError(r.url, skipped)

    @staticmethod
    def _discard(folder: str, dest: str | None) -> None:
        """Remove the temporary folder of a resume that failed (a ``dest`` of the caller's is left as it is)."""
        if dest is None:
            shutil.rmtree(folder, ignore_errors=True)

    # --- Trainer events ----------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, opt, sched = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if not isinstance(model, torch.nn.Module) or opt is None or sched is None:
            raise InvalidArgumentError("CkptkitCallback needs the Trainer's model, optimizer and LR scheduler when "
                                       "training begins (DeepSpeed and SageMaker MP create them later and are not "
                                       "supported); train without DeepSpeed, or save with the Trainer's own "
                                       "checkpoints and import them")  # fmt: skip
        if self.manager.every is None and str(getattr(args.save_strategy, "value", args.save_strategy)) == "no":
            raise InvalidArgumentError("CkptkitCallback(every=None) saves only when Trainer saves, and "
                                       "save_strategy='no' never does: pass every=N")  # fmt: skip
        components: dict[str, object] = {
            "model": model,
            "optimizer": _inner(opt, "optimizer", torch.optim.Optimizer),
            "scheduler": _inner(sched, "scheduler", torch.optim.lr_scheduler.LRScheduler),
            TRAINER_STATE: self._progress,
        }
        scaler = getattr(opt, "scaler", None)  # Accelerate keeps the GradScaler on its optimizer wrapper
        if isinstance(scaler, torch.amp.GradScaler):
            components["grad_scaler"] = scaler
        self.manager.state = components
        self._progress.state = state
        m = self._resume
        if m is not None:
            self._resume = None
            if state.global_step != m.progress.global_step:
                if self._resume_dir is not None:
                    self._discard(self._resume_dir, None)
                    self._resume_dir = None
                raise InvalidArgumentError(
                    f"resume_from() wrote {m.name} (global step {m.progress.global_step}) but Trainer starts at step "
                    f"{state.global_step}: pass the path it returned to trainer.train(resume_from_checkpoint=...)"
                )
            restored({"model": model}, m, self.manager.repo.url, "resume")  # the next save's parent
            self._last_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.manager.every is not None and self.manager.should_save(state.global_step):
            self._save(args, state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.on_trainer_save:
            self._save(args, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.manager.wait()  # raises a background save's error
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None

    def _save(self, args: TrainingArguments, state: TrainerState) -> None:
        step = state.global_step
        if step == self._last_step or not self.manager.state:
            return
        self._last_step = step
        self._progress.state = state
        # Trainer logs after on_step_end: the latest logged values (of an earlier step, unless Trainer saved)
        last = next((e for e in reversed(state.log_history) if "loss" in e), {})
        metrics = {k: float(v) for k, v in last.items() if k not in ("step", "epoch") and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip
        per_step = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        self.manager.save(step, epoch=math.floor(state.epoch or 0), samples_seen=step * per_step, metrics=metrics,
                          force=True)  # fmt: skip
