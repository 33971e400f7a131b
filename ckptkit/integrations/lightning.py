"""ckptkit inside Lightning: ``ModelCheckpoint`` saves through a ckptkit repository, ``fit(ckpt_path=...)`` resumes.

Two classes, each for what the other cannot do:

- :class:`CkptkitCheckpointIO`, a Lightning ``CheckpointIO`` plugin: every save Lightning makes (``ModelCheckpoint``,
  ``trainer.save_checkpoint``) becomes a committed ckptkit checkpoint in a repository at any fsspec URL
  (content-addressed objects, hashes checked on load, unchanged tensors stored once, lineage); loads read it back;
  ``ModelCheckpoint``'s top-k removals prune it, never the checkpoint the run resumed from.
- :class:`ProcessRNG`, a Lightning ``Callback``: Lightning does not save process RNG, and a ``CheckpointIO`` loads
  The callback records python, numpy and torch RNG in the checkpoint dict's ``callbacks`` entry, where Lightning
  itself saves and restores it, so it travels with the checkpoint: through the plugin, in Lightning's own ``.ckpt``
  files and in a ``.ckpt`` exported from ckptkit. A resume at an epoch boundary is then exact with a shuffled loader
  and dropout.

Example::

    from ckptkit.integrations.lightning import CkptkitCheckpointIO, ProcessRNG

    io = CkptkitCheckpointIO("s3://bucket/run-7")
    trainer = lightning.Trainer(plugins=[io], callbacks=[ModelCheckpoint(every_n_train_steps=500), ProcessRNG()])
    trainer.fit(module, data, ckpt_path=io.latest())     # None on a fresh run: the same line starts or resumes
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import uuid
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback

from ckptkit.engine.commit import commit_captured
from ckptkit.engine.gc import collect_garbage
from ckptkit.engine.manifests import RepoLike, latest_manifest, list_manifests, open_repository
from ckptkit.errors import (
    ArgumentTypeError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    RepositoryBusyError,
)
from ckptkit.format import DEFAULT_OBJECT_SIZE
from ckptkit.hashing import is_name
from ckptkit.interop.export_lightning import from_lightning, to_lightning
from ckptkit.manager.lineage import RunLineage
from ckptkit.schema import Manifest, Parent

__all__ = ["CkptkitCheckpointIO", "ProcessRNG"]

log = logging.getLogger("ckptkit")


class CkptkitCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stores every checkpoint in a ckptkit repository.

    A checkpoint is named after the file Lightning asks for: ``dirpath/epoch=1-step=8.ckpt`` becomes
    ``epoch_1-step_8`` (the file's stem, with every character a name may not hold replaced by ``_``); nothing is
    written under ``dirpath``. It holds two components: ``model`` (the LightningModule's ``state_dict``: restore or
    transfer it with ckptkit like any model) and ``lightning`` (the rest of the dict, typed JSON plus tensors:
    optimizers, schedulers, loops, callbacks, hyperparameters, versions); ``epoch`` and ``global_step`` become the
    manifest's progress, ``hyper_parameters`` its hparams. A save under a name that exists (``last.ckpt`` with
    ``save_last=True``) replaces it: the old manifest is archived under ``lineage/``, as a pruned one is.

    ``fit(ckpt_path=...)`` takes :meth:`latest` (None when the repository is empty), a checkpoint name, or the
    path Lightning saved to (``trainer.checkpoint_callback.best_model_path`` works). Lightning's own ``"last"``
    looks for files on disk and finds none: use :meth:`latest`. The first save after a load records lineage
    ``resume`` from it, later ones ``train`` from the one before.

    Args:
        repo: the repository: a URL (``s3://...``, any fsspec URL), a local path, or an open
            :class:`~ckptkit.storage.Repository`.
        storage_options: passed to fsspec (credentials, endpoint); never stored.
        gc: after a removal, delete the objects no checkpoint references any more.
        object_size: target size of stored objects, in bytes.

    Raises:
        ArgumentTypeError: ``repo`` is not a URL, a local path or an open Repository.
        InvalidArgumentError: ``object_size`` is not positive.

    Example::

        io = CkptkitCheckpointIO("./runs/lit")
        trainer = Trainer(plugins=[io], callbacks=[ModelCheckpoint(every_n_train_steps=100, save_top_k=3,
                                                                   monitor="val_loss")])
        trainer.fit(module, data, ckpt_path=io.latest())
    """

    def __init__(
        self,
        repo: RepoLike,
        *,
        storage_options: dict[str, Any] | None = None,
        gc: bool = True,
        object_size: int = DEFAULT_OBJECT_SIZE,
    ) -> None:
        if not isinstance(object_size, int) or isinstance(object_size, bool) or object_size <= 0:
            raise InvalidArgumentError(f"object_size={object_size!r}: must be a positive number of bytes per object")
        self.repo = open_repository(repo, storage_options)
        self.gc = bool(gc)
        self.object_size = object_size
        self.run = uuid.uuid4().hex
        self.restored_from: str | None = None
        """The checkpoint this process loaded (never removed by :meth:`remove_checkpoint`)."""
        self.last: Manifest | None = None
        """The last checkpoint this process committed."""
        self._lineage = RunLineage(self.run)

    # --- names --------------------------------------------------------------------------------------------

    def name_of(self, path: str | os.PathLike[str]) -> str:
        """The checkpoint name for a path Lightning gives (``.../epoch=1-step=8.ckpt`` -> ``epoch_1-step_8``), or
        ``path`` itself when it is already a checkpoint name.

        Raises:
            ArgumentTypeError: ``path`` is not a string or a path.
            InvalidArgumentError: nothing of it can be a checkpoint name.

        Example::

            io.name_of("/tmp/ckpts/epoch=0-step=4.ckpt")     # 'epoch_0-step_4'
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"a checkpoint path must be a string or os.PathLike, got {type(path).__name__}")
        text = os.fspath(path)
        if is_name(text) and not text.endswith(".ckpt"):
            return text
        stem = re.split(r"[/\\]", text.rstrip("/\\"))[-1].removesuffix(".ckpt")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:128].removesuffix(".json")
        if not is_name(name):
            raise InvalidArgumentError(f"cannot name a ckptkit checkpoint after {text!r}: its file name gives "
                                       f"{name!r}; give ModelCheckpoint a filename that starts with a letter or digit")
        return name

    def latest(self) -> str | None:
        """The name of the newest checkpoint in the repository, or None when it holds none: pass it to
        ``trainer.fit(ckpt_path=...)`` to resume, or to start afresh on the first run.

        Example::

            trainer.fit(module, data, ckpt_path=io.latest())
        """
        found = list_manifests(self.repo)
        return found[-1].name if found else None

    # --- CheckpointIO ---------------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Commit Lightning's checkpoint dict as checkpoint :meth:`name_of` ``(path)`` (objects first, manifest last).

        Raises:
            InvalidArgumentError: ``storage_options`` given (set them on the plugin), or no ``state_dict``.
            UnsupportedStateError: a value is neither a tensor nor storable as typed JSON; the message names the key
                (``hyper_parameters.cfg``, ``callbacks.MyCallback.obj``) and nothing is written.
        """
        if storage_options is not None:
            raise InvalidArgumentError("CkptkitCheckpointIO.save_checkpoint(storage_options=...): storage options "
                                       "belong to the repository: pass them as CkptkitCheckpointIO(url, "
                                       "storage_options=...)")  # fmt: skip
        name = self.name_of(path)
        captured, progress, hparams = from_lightning(checkpoint)
        lineage = self._lineage.edge(self.last)
        try:
            old = latest_manifest(self.repo, name)
        except CheckpointNotFoundError:
            old = None
        if old is not None:  # Lightning overwrites its files (last.ckpt): archive the old manifest, keep history
            self.repo.retire(name, old.id)
        self.last = commit_captured(self.repo, captured, name, progress=progress, hparams=hparams, lineage=lineage,
                                    object_size=self.object_size)  # fmt: skip
        self._lineage.saved()
        log.info("saved Lightning checkpoint %s as %s in %s", path, name, self.repo.url)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The Lightning checkpoint dict of checkpoint ``path`` (a name, or the path it was saved to), with every
        object hash-verified. Nothing is unpickled, so ``weights_only`` changes nothing: it is always safe.
        ``map_location`` may be a device (``"cpu"``, ``torch.device("cuda:0")``); tensors are read to the CPU.

        Raises:
            CheckpointNotFoundError: (a ``FileNotFoundError``) no such checkpoint; the message lists those there are.
            InvalidArgumentError: ``map_location`` is a function or a mapping.
            CorruptObjectError: an object's bytes do not match its hash.
        """
        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            raise InvalidArgumentError(f"map_location={map_location!r}: CkptkitCheckpointIO moves tensors to one "
                                       "device (a string or torch.device); pass that, or None for the CPU")
        name = self.name_of(path)
        try:
            m = latest_manifest(self.repo, name)
        except CheckpointNotFoundError as err:
            raise CheckpointNotFoundError(self.repo.url, name, err.available) from err
        checkpoint = to_lightning(self.repo, m)
        if map_location is not None:
            checkpoint = _to_device(checkpoint, torch.device(map_location))
        self.restored_from = m.name
        self._lineage.set("resume", [Parent(id=m.id, relation="resume", name=m.name)])
        log.info("loaded %s (step %d) from %s", m.name, m.progress.global_step, self.repo.url)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Prune checkpoint ``path`` (``ModelCheckpoint``'s top-k): its manifest moves to ``lineage/`` (history stays
        readable), then, with ``gc``, unreferenced objects are deleted. The checkpoint this process resumed from is
        never removed, nor one already gone."""
        name = self.name_of(path)
        if name == self.restored_from:
            log.info("not removing %s: this run resumed from it", name)
            return
        try:
            m = latest_manifest(self.repo, name)
            self.repo.retire(name, m.id)
        except CheckpointNotFoundError:
            return
        if self.gc:
            with contextlib.suppress(RepositoryBusyError):  # another gc runs: it, or the next one, collects
                collect_garbage(self.repo)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


class ProcessRNG(Callback):
    """Records process RNG (python ``random``, numpy's global generator, torch CPU and CUDA) in every checkpoint
    Lightning saves, and restores it when training starts after a resume.

    Lightning saves no RNG, so a resumed run shuffles and drops out differently from one never interrupted. A
    ``CheckpointIO`` could stash RNG beside the dict, but then a ``.ckpt`` exported from it, or Lightning's own,
    would lose it, and every load (``validate(ckpt_path=...)`` too) would reset the process RNG. This callback's
    state is restored when Lightning restores callbacks, before the loaders draw their first sample.
    A resume at an epoch boundary then gives the weights of an uninterrupted run bit for bit
    (tested with a shuffled loader and dropout, one process, ``num_workers=0``). Mid-epoch, Lightning restarts the
    epoch's data from its beginning, which no RNG restores. The state holds tensors and plain values only, so
    ``torch.load(weights_only=True)`` reads a ``.ckpt`` holding it.

    Example::

        trainer = Trainer(plugins=[CkptkitCheckpointIO(url)], callbacks=[ModelCheckpoint(...), ProcessRNG()])
    """

    def state_dict(self) -> dict[str, Any]:
        """The process RNG now: ``python``, ``numpy``, ``torch`` and (when CUDA is initialised) ``cuda``."""
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
        }  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set the saved RNG (Lightning calls this while it restores callbacks, after the model and before the
        loaders draw anything).

        Raises:
            InvalidArgumentError: ``state_dict`` is not what :meth:`state_dict` returns.
        """
        state = state_dict
        if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
            raise InvalidArgumentError(f"ProcessRNG state must hold 'python', 'numpy' and 'torch', got "
                                       f"{type(state).__name__}: was it saved by ProcessRNG?")  # fmt: skip
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))  # fmt: skip
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
