"""Save and resume an Accelerate training loop through ckptkit instead of ``Accelerator.save_state``.

:class:`AcceleratorCheckpoint` takes the :class:`accelerate.Accelerator` after ``prepare`` and checkpoints what
``save_state`` would, through a :class:`~ckptkit.CheckpointManager` (content-addressed, hashed, any fsspec URL,
retention, lineage): every prepared model (unwrapped, so its keys do not depend on DDP), optimizer and LR scheduler,
the grad scaler, the objects given to ``register_for_checkpointing``, accelerate's step counter, process RNG, and
the position of every prepared ``DataLoader`` that has its own ``generator`` (iterate ``ckpt.loader(dl)``, which
skips the batches a resumed run already consumed). Component names are those the ``accelerate`` importer gives a
``save_state`` folder (``model``, ``optimizer``, ``scheduler``, ``custom_checkpoint_0`` ...), so a folder imported
with :func:`ckptkit.import_from` resumes here too (``restore(strict=False)``: it holds no loader position).

Why a wrapper and not ``register_save_state_pre_hook`` / ``register_load_state_pre_hook``: the save hook runs
before accelerate writes its own folder (both would be written), is told no step, and the load hook cannot stop
``load_state`` from unpickling ``custom_checkpoint_*.pkl`` with ``weights_only=False``.

In a multi-process run the main process saves (the models are replicated); every process restores, and only the
main process restores process RNG (the others' fidelity report says so). ``accelerate`` is imported by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckptkit.engine.manifests import RepoLike
from ckptkit.engine.restore import RestoreResult
from ckptkit.errors import ArgumentTypeError, InvalidArgumentError
from ckptkit.manager import CheckpointManager
from ckptkit.manager.retention import Retention
from ckptkit.schema import Manifest
from ckptkit.training.loader import LoaderPosition

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["AcceleratorCheckpoint"]

log = logging.getLogger("ckptkit")


class _Counters:
    """accelerate's own counter that a resume needs: ``Accelerator.step`` (micro-batches seen, which decides when
    ``accumulate`` syncs gradients)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


def _name(kind: str, i: int) -> str:
    return kind if i == 0 else f"{kind}_{i}"


class AcceleratorCheckpoint:
    """Checkpoints an Accelerate run through ckptkit: build it after ``accelerator.prepare(...)`` (and after
    ``register_for_checkpointing``), ``restore()`` once, ``save(step)`` in the loop.

    Args:
        accelerator: the ``accelerate.Accelerator`` whose prepared objects are saved.
        target: a repository (URL, local path, open :class:`~ckptkit.storage.Repository`), or a
            :class:`~ckptkit.CheckpointManager` you built (with components of your own, e.g. an EMA); the
            accelerator's components are added to its state.
        every: with a URL, ``save(step)`` writes when ``step`` is a multiple of this.
        retention: with a URL, which checkpoints to keep.
        name_format: with a URL, the checkpoint names.
        hparams: with a URL, hyperparameters recorded in every checkpoint.
        storage_options: with a URL, passed to fsspec.
        async_save: with a URL, write in the background (``save`` returns None, :meth:`close` waits).

    Raises:
        ArgumentTypeError: ``accelerator`` is not an Accelerator, or ``target`` is none of the above.
        InvalidArgumentError: manager options given with a manager, or a component name of the accelerator's is
            already in the manager's state.

    Example::

        model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
        ckpt = AcceleratorCheckpoint(accelerator, "s3://bucket/run-7", every=500,
                                     retention=ckptkit.Retention(keep_last=3))
        resumed = ckpt.restore()                  # None on a fresh run
        step = resumed.progress.global_step if resumed else 0
        while step < total:
            for batch in ckpt.loader(dl):         # skips the batches the resumed run already saw
                ...                               # forward, accelerator.backward, opt.step, sched.step
                step += 1
                ckpt.save(step, metrics={"loss": loss.item()})
        ckpt.close()
    """

    def __init__(
        self,
        accelerator: Accelerator,
        target: RepoLike | CheckpointManager,
        *,
        every: int | None = None,
        retention: Retention | None = None,
        name_format: str = "step-{step:08d}",
        hparams: Mapping[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        async_save: bool = False,
    ) -> None:
        if not all(hasattr(accelerator, a) for a in ("_models", "_optimizers", "_schedulers", "_custom_objects")):
            raise ArgumentTypeError(f"AcceleratorCheckpoint needs an accelerate.Accelerator, got "
                                    f"{type(accelerator).__name__}")  # fmt: skip
        self.accelerator = accelerator
        self.positions: dict[int, LoaderPosition] = {}
        state = self._components()
        if isinstance(target, CheckpointManager):
            given = {"every": every, "retention": retention, "hparams": hparams, "storage_options": storage_options}
            set_ = [k for k, v in given.items() if v is not None]
            if set_ or async_save or name_format != "step-{step:08d}":
                raise InvalidArgumentError(f"options {set_ or ['async_save / name_format']} apply when "
                                           "AcceleratorCheckpoint builds the manager from a URL; with a "
                                           "CheckpointManager, pass them to CheckpointManager(...)")  # fmt: skip
            clash = sorted(set(state) & set(target.state))
            if clash:
                raise InvalidArgumentError(f"the manager's state already has {clash}, names AcceleratorCheckpoint "
                                           "gives the accelerator's components: rename yours")  # fmt: skip
            target.state.update(state)
            self.manager = target
        else:  # a repository of the wrong type raises ArgumentTypeError there
            self.manager = CheckpointManager(target, state, every=every, retention=retention, name_format=name_format,
                                             hparams=hparams, storage_options=storage_options,
                                             async_save=async_save)  # fmt: skip
        if not accelerator.is_main_process:
            self.manager.rng = False  # process RNG differs per process; the main process's is the one saved

    def _components(self) -> dict[str, object]:
        acc = self.accelerator
        state: dict[str, object] = {}
        for i, m in enumerate(acc._models):
            state[_name("model", i)] = acc.unwrap_model(m)  # keys without DDP's "module." prefix
        for i, o in enumerate(acc._optimizers):
            state[_name("optimizer", i)] = getattr(o, "optimizer", o)  # accelerate's wrapper delegates to it
        for i, s in enumerate(acc._schedulers):
            state[_name("scheduler", i)] = getattr(s, "scheduler", s)
        if acc.scaler is not None:
            state["grad_scaler"] = acc.scaler
        for i, obj in enumerate(acc._custom_objects):
            state[f"custom_checkpoint_{i}"] = obj
        state["accelerator"] = _Counters(acc)
        untracked = []
        for i, dl in enumerate(getattr(acc, "_dataloaders", [])):
            if getattr(dl, "generator", None) is None:
                untracked.append(i)
                continue
            pos = LoaderPosition(dl)
            self.positions[id(dl)] = pos
            state[_name("dataloader", i)] = pos
        if untracked:
            log.warning("AcceleratorCheckpoint: prepared DataLoader(s) %s have no generator, so their position is not "
                        "saved and a resume restarts their epoch; build them with DataLoader(..., generator="
                        "torch.Generator().manual_seed(seed))", untracked)  # fmt: skip
        return state

    def loader(self, dataloader: Any) -> LoaderPosition:
        """What to iterate instead of the prepared ``dataloader``: its batches, minus those a resumed run already
        consumed in this epoch; its ``epoch`` counts finished epochs.

        Raises:
            InvalidArgumentError: ``dataloader`` is not one this accelerator prepared with a ``generator``.
        """
        pos = self.positions.get(id(dataloader))
        if pos is None:
            raise InvalidArgumentError(
                "this DataLoader is not tracked: pass the one accelerator.prepare returned, built with its own "
                "generator (DataLoader(..., generator=torch.Generator().manual_seed(seed))), and build the "
                "AcceleratorCheckpoint after prepare"
            )
        return pos

    def restore(self, name: str | None = None, *, strict: bool = True) -> RestoreResult | None:
        """Restore checkpoint ``name`` (the latest by default) into the accelerator's objects, RNG last; None when
        the repository holds none (a fresh run). ``result.fidelity`` says whether the resume is exact."""
        return self.manager.restore(name, strict=strict)

    def save(
        self,
        step: int,
        *,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> Manifest | None:
        """Save at optimizer step ``step`` if due (``every``) or ``force``; only the main process writes.

        ``epoch`` defaults to the first tracked loader's. Returns the committed manifest, or None (not due, another
        process, or ``async_save``)."""
        if not self.accelerator.is_main_process:
            return None
        pos = next(iter(self.positions.values()), None)
        if epoch is None:
            epoch = pos.epoch if pos is not None else 0
        in_epoch = pos.batches_in_epoch if pos is not None else 0
        return self.manager.save(step, epoch=epoch, step_in_epoch=in_epoch, metrics=metrics, force=force)

    def close(self) -> None:
        """Wait for a background save and close the manager."""
        self.manager.close()
