"""Import checkpoints written by other tools into a ckptkit repository, without unpickling arbitrary objects.

Formats (``format=None`` detects them; :mod:`~ckptkit.interop.importers.registry` lists them, as :data:`FORMATS`):

- ``hf-pretrained``: a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, sharded safetensors with
  an index, or ``pytorch_model.bin``).
- ``hf-trainer``: a ``transformers.Trainer`` ``checkpoint-N`` folder: the weights as above, plus ``optimizer.pt``,
  ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` and ``trainer_state.json``.
- ``lightning``: a Lightning ``.ckpt`` file.
- ``timm``: a timm training checkpoint (what ``timm.utils.CheckpointSaver`` writes).
- ``mmdet``: an MMDetection / mmengine ``.pth`` (``meta`` + ``state_dict`` + ``optimizer``).
- ``accelerate``: an ``accelerate.Accelerator.save_state`` folder (``model.safetensors``, ``optimizer.bin``,
  ``scheduler.bin``, ``scaler.pt``, ``random_states_<process>.pkl``, ``custom_checkpoint_<i>.pkl`` ...).
- ``dcp``: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``).

How files are read: torch files with ``torch.load(weights_only=True)`` (:func:`ckptkit.state.files.read_torch_file`),
safetensors with safetensors, JSON with ``json``; DCP's ``.metadata`` (a pickle of DCP's dataclasses, which
torch's weights-only unpickler cannot read because DCP writes it with pickle protocol 4+) with an unpickler that
resolves only those dataclasses and the torch types they hold. Anything that needs another class is refused with
:class:`~ckptkit.errors.UnsupportedStateError` naming the file, the class and, where it can be found, the entry;
HF's ``training_args.bin`` (a pickled ``TrainingArguments``) is never opened.

The result is committed through the engine's commit (:mod:`ckptkit.engine.commit`), like any save: objects
first, manifest last, with lineage relation ``import`` and ``source`` = the format, the path, the blake3 of every
source file, what was skipped and why, and notes.

Importing this package imports no torch, so the CLI can offer :data:`FORMATS` as its ``--format`` choices;
:func:`import_from`, :func:`detect_format` and the pickle scan load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptkit.errors import ImportFormatError
from ckptkit.interop.importers.registry import FORMATS

if TYPE_CHECKING:
    from ckptkit.interop.importers._pickle import RefusedPickleError, unsafe_globals
    from ckptkit.interop.importers.files import import_files
    from ckptkit.interop.importers.pipeline import detect_format, import_from

__all__ = ["FORMATS", "ImportFormatError", "RefusedPickleError", "detect_format", "import_files", "import_from",
           "unsafe_globals"]  # fmt: skip

_WHERE = {
    "import_from": "ckptkit.interop.importers.pipeline",
    "import_files": "ckptkit.interop.importers.files",
    "detect_format": "ckptkit.interop.importers.pipeline",
    "RefusedPickleError": "ckptkit.interop.importers._pickle",
    "unsafe_globals": "ckptkit.interop.importers._pickle",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'ckptkit.interop.importers' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
