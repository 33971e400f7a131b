"""The formats :func:`~ckptkit.interop.importers.import_from` reads, in one place: each :class:`Reader` names its
format, says whether it reads a file or a folder, how a source of that format is recognised, what the layout holds
(for the error when nothing matches), where its reader function lives (imported on first use) and how to re-save a
file of that format that needs unpickling objects.

``import_from``, ``detect_format`` and the CLI's ``--format`` choices (:data:`FORMATS`) all derive from
:data:`READERS`. This module imports no torch, so the CLI can list the formats without paying for it.

Example:
    >>> find_reader("lightning").layout
    'file'
    >>> detect_folder({".metadata", "__0_0.distcp"})
    'dcp'
    >>> detect_folder({"model.safetensors", "optimizer.bin", "random_states_0.pkl"})
    'accelerate'
    >>> detect_dict({"arch": "resnet18", "state_dict": {}, "epoch": 3})
    'timm'
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from ckptkit.errors import ImportFormatError

if TYPE_CHECKING:
    import torch

    from ckptkit.interop.importers._common import ImportRecord

    ReadFunction = Callable[[ImportRecord, Any, torch.nn.Module | None], None]

__all__ = ["FORMATS", "HF_WEIGHTS", "LAYOUTS", "READERS", "Reader", "detect_dict", "detect_folder", "find_reader"]


@dataclass(frozen=True)
class Reader:
    """One format that :func:`~ckptkit.interop.importers.import_from` reads.

    Attributes:
        name: the format's name (``import_from(format=...)``, ``ckptkit import --format``).
        layout: ``"folder"`` or ``"file"``.
        holds: what a source of this format holds, in words (shown when a source is not recognised).
        detect: whether a source is of this format: for a folder, given the names of the files in it; for a file,
            given the dict that ``torch.load(weights_only=True)`` returned. :data:`READERS` is tried in order and the
            first reader that accepts a source wins, so a more specific layout comes before one it contains.
        function: ``"module:function"`` of the reader, imported on first use (formats import their framework only
            when a source of theirs is read). It is called with the import record, the loaded file (``None`` for a
            folder) and the ``model=`` given to ``import_from``.
        pickle_hint: how to re-save a file of this format whose entries need unpickling Python objects.
    """

    name: str
    layout: Literal["file", "folder"]
    holds: str
    detect: Callable[[Any], bool]
    function: str
    pickle_hint: str = ""

    def load(self) -> ReadFunction:
        """The reader function (imports its module)."""
        module, _, attr = self.function.partition(":")
        return cast("ReadFunction", getattr(importlib.import_module(module), attr))


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""The weight files (or shard indexes) of a ``save_pretrained`` folder."""


def _is_hf(files: Collection[str]) -> bool:
    return "config.json" in files and any(w in files for w in HF_WEIGHTS)


_ACCELERATE_WEIGHTS = re.compile(r"(model|pytorch_model)(_\d+)?\.(safetensors|bin)")


def _is_accelerate(files: Collection[str]) -> bool:
    """An ``Accelerator.save_state`` folder: a ``random_states_<process>.pkl`` (accelerate's name; HF Trainer writes
    ``rng_state.pth``), or accelerate's ``optimizer.bin`` beside model weights; never a Trainer folder."""
    if "trainer_state.json" in files:
        return False
    if any(re.fullmatch(r"random_states_\d+\.pkl", f) for f in files):
        return True
    return "optimizer.bin" in files and any(_ACCELERATE_WEIGHTS.fullmatch(f) for f in files)


def _is_lightning(data: Mapping[Any, Any]) -> bool:
    return "pytorch-lightning_version" in data or ("state_dict" in data and "optimizer_states" in data)


_IMPORTERS = "ckptkit.interop.importers"

READERS: tuple[Reader, ...] = (
    Reader("dcp", "folder", "folder with a .metadata file", lambda files: ".metadata" in files,
           f"{_IMPORTERS}.dcp:read_dcp"),
    Reader("accelerate", "folder",
           "folder with random_states_<process>.pkl, or optimizer.bin beside model.safetensors / pytorch_model.bin "
           "(an Accelerator.save_state folder)", _is_accelerate, f"{_IMPORTERS}.accelerate:read_accelerate"),
    Reader("hf-trainer", "folder", "the hf-pretrained files plus trainer_state.json (a Trainer checkpoint-N folder)",
           lambda files: _is_hf(files) and "trainer_state.json" in files, f"{_IMPORTERS}.hf:read_hf_trainer"),
    Reader("hf-pretrained", "folder",
           "folder with config.json and model.safetensors / model.safetensors.index.json / pytorch_model.bin",
           _is_hf, f"{_IMPORTERS}.hf:read_hf_pretrained"),
    Reader("lightning", "file", ".ckpt file with 'pytorch-lightning_version', 'state_dict', 'optimizer_states'",
           _is_lightning, f"{_IMPORTERS}.lightning:read_lightning",
           "Save hyperparameters as plain values (self.save_hyperparameters() with plain arguments, vars(args) instead "
           "of an argparse.Namespace, or ignore=[...] for objects), or re-save the checkpoint where you trust its "
           "source without those entries."),
    Reader("mmdet", "file", "file with a 'meta' dict and 'state_dict'",
           lambda data: isinstance(data.get("meta"), dict) and "state_dict" in data,
           f"{_IMPORTERS}.mmdet:read_mmdet",
           "mmengine's Runner stores its MessageHub (read as plain data: HistoryBuffers and numpy values); another "
           "object is not read: load the file where you trust its source, replace the objects named above by plain "
           "values and torch.save it again."),
    Reader("timm", "file", "file with 'arch' and 'state_dict'",
           lambda data: "arch" in data and ("state_dict" in data or "state_dict_ema" in data),
           f"{_IMPORTERS}.timm:read_timm",
           "timm's CheckpointSaver stores the training script's `args` (read as plain data when it is an "
           "argparse.Namespace of plain values): load it where you trust its source, replace the objects named above "
           "by plain values (numbers, strings, lists, dicts) and torch.save it again."),
)  # fmt: skip
"""Every format, in the order detection tries them."""

FORMATS: tuple[str, ...] = tuple(r.name for r in READERS)
"""The names of the formats :func:`~ckptkit.interop.importers.import_from` reads."""

LAYOUTS = "; ".join(f"{r.name}: {r.holds}" for r in READERS)
"""What each format's source holds, in words (for errors that say which layouts are known)."""


def find_reader(name: str) -> Reader:
    """The reader of format ``name``.

    Raises:
        ImportFormatError: no format has that name.
    """
    for r in READERS:
        if r.name == name:
            return r
    raise ImportFormatError(f"unknown format {name!r}: choose one of {', '.join(FORMATS)}, or None to detect it")


def detect_folder(files: Collection[str]) -> str | None:
    """The format of a folder holding the files named ``files``, or None."""
    return next((r.name for r in READERS if r.layout == "folder" and r.detect(files)), None)


def detect_dict(data: Any) -> str | None:
    """The format of a loaded checkpoint file (what ``torch.load(weights_only=True)`` returned), or None."""
    if not isinstance(data, dict):
        return None
    return next((r.name for r in READERS if r.layout == "file" and r.detect(data)), None)
