"""Import checkpoints written by other tools into a ckptkit repository, without unpickling arbitrary objects.

Formats (``format=None`` detects them):

- ``hf-pretrained``: a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, sharded safetensors with
  an index, or ``pytorch_model.bin``).
- ``hf-trainer``: a ``transformers.Trainer`` ``checkpoint-N`` folder: the weights as above, plus ``optimizer.pt``,
  ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` and ``trainer_state.json``.
- ``lightning``: a Lightning ``.ckpt`` file.
- ``timm``: a timm training checkpoint (what ``timm.utils.CheckpointSaver`` writes).
- ``mmdet``: an MMDetection / mmengine ``.pth`` (``meta`` + ``state_dict`` + ``optimizer``).
- ``dcp``: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``).

How files are read: torch files with ``torch.load(weights_only=True)`` (:func:`ckptkit.files.read_torch_file`),
safetensors with safetensors, JSON with ``json``; DCP's ``.metadata`` (a pickle of DCP's dataclasses, which
torch's weights-only unpickler cannot read because DCP writes it with pickle protocol 4+) with an unpickler that
resolves only those dataclasses and the torch types they hold. Anything that needs another class is refused with
:class:`~ckptkit.errors.UnsupportedStateError` naming the file, the class and, where it can be found, the entry;
HF's ``training_args.bin`` (a pickled ``TrainingArguments``) is never opened.

The result is committed through :func:`ckptkit.api.commit_captured`, like any save: objects first, manifest last,
with lineage relation ``import`` and ``source`` = the format, the path, the blake3 of every source file, what was
skipped and why, and notes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch

from ckptkit.api import commit_captured, open_repository
from ckptkit.errors import CheckpointExistsError
from ckptkit.importers._common import ImportFormatError, _describe, _detect_dict, _Import
from ckptkit.importers._pickle import _HINTS, RefusedPickleError, _load_torch
from ckptkit.importers._pickle import unsafe_globals as unsafe_globals
from ckptkit.importers.dcp import _read_dcp
from ckptkit.importers.hf import _HF_WEIGHTS, _read_hf_pretrained, _read_hf_trainer
from ckptkit.importers.lightning import _read_lightning
from ckptkit.importers.mmdet import _read_mmdet
from ckptkit.importers.timm import _read_timm
from ckptkit.schema import Lineage, Manifest, Progress
from ckptkit.storage import check_name

__all__ = ["FORMATS", "ImportFormatError", "RefusedPickleError", "detect_format", "import_from"]

FORMATS = ("hf-pretrained", "hf-trainer", "lightning", "timm", "mmdet", "dcp")
"""The formats :func:`import_from` reads."""

_LAYOUTS = (
    "hf-pretrained: folder with config.json and model.safetensors / model.safetensors.index.json / "
    "pytorch_model.bin; hf-trainer: the same plus trainer_state.json (a Trainer checkpoint-N folder); "
    "lightning: .ckpt file with 'pytorch-lightning_version', 'state_dict', 'optimizer_states'; "
    "timm: file with 'arch' and 'state_dict'; mmdet: file with a 'meta' dict and 'state_dict'; "
    "dcp: folder with a .metadata file"
)


def import_from(
    src: str,
    repo: str,
    name: str | None = None,
    *,
    format: str | None = None,
    storage_options: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
) -> Manifest:
    """Convert the foreign checkpoint ``src`` (a local file or folder) into checkpoint ``name`` of ``repo``.

    Args:
        src: the checkpoint file or folder on local disk.
        repo: repository URL (any fsspec URL).
        name: checkpoint name; by default derived from ``src`` (``checkpoint-500``, ``last`` ...).
        format: one of :data:`FORMATS`; ``None`` detects it.
        storage_options: passed to fsspec for ``repo``.
        model: optional, for formats whose files do not say which model they hold (``lightning``, ``mmdet``,
            ``dcp``, and ``timm`` when ``arch`` is not a timm model name): an instance of the architecture
            (its weights are neither read nor changed) whose parameter names key the optimizer state and whose
            adapter records the model metadata. HF formats rebuild the model from ``config.json`` instead.

    Returns:
        The committed manifest; ``manifest.lineage.source`` records where it came from.

    Raises:
        UnsupportedStateError: a file needs unpickling an arbitrary object (the message names the class and entry).
        ImportFormatError: the layout is not one of :data:`FORMATS`, or does not hold what its format promises.
        CkptkitError: optimizer state cannot be mapped to parameter names with certainty.
    """
    path = os.path.abspath(os.fspath(src))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {src}")
    if format is not None and format not in FORMATS:
        raise ImportFormatError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)} (or None to detect)")
    name = check_name(name if name is not None else _default_name(path))
    r = open_repository(repo, storage_options)
    if name in r.list():  # fail before reading gigabytes; the commit checks again
        raise CheckpointExistsError(r.url, name)
    fmt, data = _open(path, format)
    imp = _Import(fmt, path)
    _READERS[fmt](imp, data, model)
    for c in imp.components:
        check_name(c.name)
    lineage = Lineage(relation="import", source=imp.source())
    progress = Progress(epoch=max(imp.epoch, 0), global_step=max(imp.global_step, 0))
    return commit_captured(r, imp.components, name, progress=progress, metrics=imp.metrics, hparams=imp.hparams,
                           lineage=lineage)  # fmt: skip


def detect_format(src: str) -> str:
    """Which of :data:`FORMATS` ``src`` is (reads a file with ``torch.load(weights_only=True)`` to tell)."""
    return _open(os.path.abspath(os.fspath(src)), None)[0]


def _default_name(path: str) -> str:
    base = os.path.basename(path.rstrip(os.sep))
    for ext in (".pth.tar", ".ckpt", ".pth", ".pt", ".bin", ".tar"):
        if base.endswith(ext) and len(base) > len(ext):
            base = base[: -len(ext)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip("._-")[:128]
    return base or "imported"


def _open(path: str, fmt: str | None) -> tuple[str, Any]:
    """The format and, for single files, their content (read once: detection needs it)."""
    if os.path.isdir(path):
        files = set(os.listdir(path))
        found = "dcp" if ".metadata" in files else None
        if found is None and "config.json" in files and any(w in files for w in _HF_WEIGHTS):
            found = "hf-trainer" if "trainer_state.json" in files else "hf-pretrained"
        if fmt is None and found is None:
            shown = ", ".join(sorted(files)[:20]) + (" ..." if len(files) > 20 else "")
            raise ImportFormatError(f"cannot tell the format of folder {path}: it holds [{shown}]; known layouts: "
                                    f"{_LAYOUTS}")  # fmt: skip
        fmt = fmt or found
        assert fmt is not None
        if fmt not in ("hf-pretrained", "hf-trainer", "dcp"):
            raise ImportFormatError(f"format {fmt!r} is a single file, but {path} is a folder")
        needs = {"dcp": ".metadata", "hf-trainer": "trainer_state.json", "hf-pretrained": "config.json"}[fmt]
        if needs not in files:
            raise ImportFormatError(f"{path} is no {fmt} folder: it has no {needs}; known layouts: {_LAYOUTS}")
        return fmt, None
    if fmt in ("hf-pretrained", "hf-trainer", "dcp"):
        raise ImportFormatError(f"format {fmt!r} is a folder, but {path} is a file")
    data = _load_torch(path, _HINTS.get(fmt) if fmt else None)
    found = _detect_dict(data)
    if fmt is None:
        if found is None:
            raise ImportFormatError(f"cannot tell the format of {path}: {_describe(data)}; known layouts: {_LAYOUTS}")
        fmt = found
    return fmt, data


_READERS: dict[str, Callable[[_Import, Any, torch.nn.Module | None], None]] = {
    "hf-pretrained": _read_hf_pretrained,
    "hf-trainer": _read_hf_trainer,
    "lightning": _read_lightning,
    "timm": _read_timm,
    "mmdet": _read_mmdet,
    "dcp": _read_dcp,
}
