"""Export a checkpoint's model to its framework's own format (HF folder, timm file, torchvision state dict)."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from ckptkit.engine.manifests import RepoLike, latest_manifest, model_name, open_repository
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import DestinationNotEmptyError, InvalidArgumentError
from ckptkit.state.adapter import get_adapter

__all__ = ["FORMATS", "PROVENANCE", "export"]

PROVENANCE = "ckptkit.json"
"""Written beside the exported files: which checkpoint they came from (read back by import and lineage)."""

FORMATS: dict[str, str] = {
    "model": "the model in its framework's own format (HF save_pretrained folder, timm file, ...): the default",
    "hf-trainer": "an HF Trainer checkpoint-N folder that Trainer.train(resume_from_checkpoint=...) resumes",
    "lightning": "a Lightning .ckpt that Trainer.fit(ckpt_path=...) resumes (loads with weights_only=True)",
}
"""The formats :func:`export` writes, each with what it is."""

_WRITERS = {  # format -> (module, function(repo, manifest, dest, component) -> files written)
    "hf-trainer": ("ckptkit.interop.export_hf_trainer", "export_hf_trainer"),
    "lightning": ("ckptkit.interop.export_lightning", "export_lightning"),
}


def export(
    repo: RepoLike,
    dest: str,
    name: str | None = None,
    *,
    component: str | None = None,
    format: str = "model",
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write checkpoint ``name``'s model (the latest by default) into the folder ``dest`` in its framework's format.

    HF models become a ``save_pretrained`` folder (``AutoModel*.from_pretrained(dest)`` loads it), timm models a
    ``model.safetensors`` that ``timm.create_model(arch, pretrained=True,
    pretrained_cfg_overlay=dict(file=...))`` loads, torchvision detectors a ``model.pth`` state dict, fusion
    models one folder per branch. Returns the files written.

    Args:
        repo: the repository: URL, local path or open :class:`~ckptkit.storage.Repository`.
        dest: the folder to write (a new or empty one).
        name: the checkpoint (default: the latest).
        component: the model component to export, when the checkpoint holds several.
        format: what to write (one of :data:`FORMATS`): ``"model"`` (the model alone, in its framework's format),
            ``"hf-trainer"`` (a ``checkpoint-N`` folder HF ``Trainer`` resumes from) or ``"lightning"`` (a ``.ckpt``
            Lightning's ``fit(ckpt_path=...)`` resumes from).

    Raises:
        InvalidArgumentError: an unknown ``format``, or a checkpoint that format cannot hold (the message says why).
        ArgumentTypeError: ``repo`` is not a URL, a local path or an open Repository.
        DestinationNotEmptyError: ``dest`` already holds files (nothing is written).

    Example:
        >>> import torch, ckptkit, tempfile
        >>> _ = ckptkit.save("memory://doc-export", {"model": torch.nn.Linear(2, 2)}, "a")
        >>> [f.rsplit("/", 1)[1] for f in ckptkit.export("memory://doc-export", tempfile.mkdtemp())]
        ['model.safetensors', 'ckptkit.json']
    """
    if format not in FORMATS:
        raise InvalidArgumentError(f"export format {format!r} is not one of {sorted(FORMATS)}: "
                                   + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()))  # fmt: skip
    r = open_repository(repo, storage_options)
    m = latest_manifest(r, name)
    if format != "model":
        if os.path.exists(dest) and os.listdir(dest):
            raise DestinationNotEmptyError(dest)
        module, func = _WRITERS[format]
        written: list[str] = getattr(importlib.import_module(module), func)(r, m, dest, component)
        return written
    comp = model_name(m, component)
    c = m.components[comp]
    tensors = load_tensors(r, m, [comp])[comp]
    if os.path.exists(dest) and os.listdir(dest):
        raise DestinationNotEmptyError(dest)
    written = get_adapter(c.adapter or "plain").export(tensors, dict(c.meta), dest)
    for n, other in m.components.items():
        if other.type == "ckptkit.adapters.hf.Tokenizer":  # saved with the model: goes beside it
            from ckptkit.adapters.hf import write_files
            from ckptkit.format import decode

            written += write_files(decode(other.state, {}, n), dest)
    prov = os.path.join(dest, PROVENANCE)
    with open(prov, "w") as f:
        json.dump({"checkpoint": m.id, "name": m.name, "url": r.url, "component": comp, "adapter": c.adapter}, f,
                  indent=2)  # fmt: skip
    return [*written, prov]
