"""Bare files in one call: a weights file, an optional optimizer file and the progress they stand for become a
checkpoint with an ``import`` edge, which ``CheckpointManager.continue_from`` continues like any other.

This is the shape of tools that keep training state as loose files (mlr3torch's ``t_clbk("resume", weights_path,
optim_path, epochs)``, a script's ``torch.save(model.state_dict(), "weights.pt")``): every file is read and
checked (and a bad one refused with a typed error naming it) before anything is committed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.engine.commit import commit_captured
from ckptkit.engine.manifests import RepoLike, open_repository
from ckptkit.errors import ArgumentTypeError, CheckpointExistsError, InvalidArgumentError, SourceNotFoundError
from ckptkit.hashing import check_name
from ckptkit.interop.importers._common import ImportRecord, model_meta
from ckptkit.interop.importers._optimizer import check_optimizer_dict, name_optimizer
from ckptkit.schema import DataSegment, Lineage, Manifest, Progress
from ckptkit.state.capture import model_component
from ckptkit.state.files import prepare_model_tensors, read_tensor_file, read_torch_file

__all__ = ["import_files"]


def import_files(
    repo: RepoLike,
    weights: str | os.PathLike[str],
    *,
    optimizer: str | os.PathLike[str] | None = None,
    model: torch.nn.Module | None = None,
    step: int = 0,
    epoch: int = 0,
    samples_seen: int = 0,
    name: str | None = None,
    data: list[DataSegment] | None = None,
    hparams: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Make a checkpoint of bare files: ``weights`` (a torch ``state_dict`` file or ``.safetensors``), optionally
    ``optimizer`` (a torch file of ``optimizer.state_dict()``), at the progress given (``step`` optimizer steps,
    ``epoch`` epochs). The checkpoint's lineage is ``import``, with the files' paths and blake3 hashes.

    Args:
        repo: repository URL, local path or open :class:`~ckptkit.storage.Repository`.
        weights: the weights file; torch files are read with ``torch.load(weights_only=True)`` (tensors and plain
            containers only; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped).
        optimizer: the optimizer file. Its parameters are numbered; they are named by ``model`` (checked against
            every saved state shape), or without one by order when that is certain (one parameter group, exactly
            one ordered fit to the weights' tensors), else refused.
        model: an instance of the architecture, to check the weights against (every key and shape) and to name
            the optimizer's parameters; its weights are neither read nor changed.
        step, epoch, samples_seen: where training stood when the files were written.
        name: the checkpoint name (default ``import-step-<step>``); an existing name is refused.
        data: the data the weights were trained on, recorded as the checkpoint's data segments.
        hparams: recorded in the checkpoint.

    Raises:
        SourceNotFoundError: a file does not exist.
        SourceFormatError, UnsupportedStateError, ImportFormatError: a file is not what it should be.
        StateMismatchError: the weights do not fit ``model``.
        OptimizerMappingError: the optimizer's parameters cannot be named with certainty.
        CheckpointExistsError: ``repo`` already has checkpoint ``name``.

    Example:
        >>> import tempfile, torch, ckptkit
        >>> d = tempfile.mkdtemp()
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> torch.save(model.state_dict(), f"{d}/weights.pt"); torch.save(opt.state_dict(), f"{d}/optim.pt")
        >>> m = ckptkit.import_files(f"{d}/repo", f"{d}/weights.pt", optimizer=f"{d}/optim.pt", model=model,
        ...                          epoch=100, step=400)
        >>> m.name, m.lineage.relation, sorted(m.components), m.progress.epoch
        ('import-step-00000400', 'import', ['model', 'optimizer'], 100)
    """
    for arg, value in (("step", step), ("epoch", epoch), ("samples_seen", samples_seen)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgumentError(f"import_files({arg}={value!r}): must be a non-negative integer")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"import_files(model=...) must be a torch.nn.Module, got {type(model).__name__}")
    if data is not None and not (isinstance(data, list) and all(isinstance(d, DataSegment) for d in data)):
        raise ArgumentTypeError("import_files(data=...) must be a list of ckptkit.schema.DataSegment")
    paths = {"weights": _path(weights, "weights")}
    if optimizer is not None:
        paths["optimizer"] = _path(optimizer, "optimizer")
    name = check_name(name if name is not None else f"import-step-{step:08d}")
    r = open_repository(repo, storage_options)
    if name in r.list():  # fail before reading anything; the commit checks again
        raise CheckpointExistsError(r.url, name)

    imp = ImportRecord("files", paths["weights"])
    tensors = read_tensor_file(paths["weights"])
    imp.hash_file(paths["weights"])
    if model is not None:
        prepare_model_tensors("model", model, tensors, strict=True)  # checks every key and shape; loads nothing
    adapter, meta = model_meta(imp, "files", model, tensors)
    components = [model_component("model", tensors, model, adapter=adapter, meta=meta)]
    if "optimizer" in paths:
        where = paths["optimizer"]
        osd = check_optimizer_dict(read_torch_file(where), where)
        components.append(name_optimizer(imp, "optimizer", osd, where, model, tensors, positional=False))
        imp.hash_file(where)
    imp.info["paths"] = dict(paths)
    imp.info["progress"] = {"epoch": epoch, "global_step": step, "samples_seen": samples_seen,
                            "as": "given by the caller"}  # fmt: skip
    progress = Progress(epoch=epoch, global_step=step, samples_seen=samples_seen)
    return commit_captured(r, components, name, progress=progress, hparams=dict(hparams or {}), data=data,
                           lineage=Lineage(relation="import", source=imp.source()))  # fmt: skip


def _path(value: object, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"import_files({what}=...) must be a path, got {type(value).__name__}")
    path = os.path.abspath(os.fspath(value))
    if not os.path.isfile(path):
        raise SourceNotFoundError(path, f"{what} file")
    return str(path)
