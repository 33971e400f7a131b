"""Lightning checkpoint dicts in and out of ckptkit's format, and the ``lightning`` export (a ``.ckpt`` file).

A Lightning checkpoint dict (what ``Trainer.save_checkpoint`` hands its ``CheckpointIO``) is stored as two
components: ``model`` (the LightningModule's ``state_dict``, tensors in objects, tied weights once) and ``lightning``
(everything else: ``optimizer_states``, ``lr_schedulers``, ``loops``, ``callbacks``, ``hyper_parameters``, ``epoch``,
``global_step``, version strings and whatever ``on_save_checkpoint`` added), typed JSON with its tensors in objects.
Nothing is pickled; a value that is neither a tensor nor storable as typed JSON is refused, naming its key.

:func:`export_lightning` writes such a checkpoint back as the dict Lightning saved, and builds one from any other
ckptkit checkpoint (model, optimizers keyed by parameter name, schedulers, progress).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ckptkit.engine.manifests import model_name
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import InvalidArgumentError, MissingDependencyError, UnsupportedStateError
from ckptkit.format import decode, encode
from ckptkit.schema import Manifest, Progress, resolve_aliases
from ckptkit.state import Captured
from ckptkit.state.capture import model_component
from ckptkit.storage import Repository

__all__ = ["LIGHTNING_COMPONENT", "export_lightning", "from_lightning", "to_lightning"]

LIGHTNING_COMPONENT = "lightning"
"""The component that holds a Lightning checkpoint dict's entries other than ``state_dict``."""

_MODEL = "model"
_MODULE_TYPE = "lightning.pytorch.core.module.LightningModule"
_HPARAMS_FIX = ("pass plain values (numbers, strings, lists, dicts, tensors) to save_hyperparameters(), or leave "
                "this one out with save_hyperparameters(ignore=[...])")  # fmt: skip


def from_lightning(checkpoint: Mapping[str, Any]) -> tuple[list[Captured], Progress, dict[str, Any]]:
    """Split a Lightning checkpoint dict into ckptkit components, its progress and the hparams to record.

    Raises:
        InvalidArgumentError: ``checkpoint`` has no ``state_dict`` of tensors.
        UnsupportedStateError: a value is neither a tensor nor storable as typed JSON (the key is named).

    Example:
        >>> comps, progress, hp = from_lightning({"state_dict": {"w": torch.ones(2)}, "epoch": 1, "global_step": 8,
        ...                                       "hyper_parameters": {"lr": 0.1}})
        >>> [c.name for c in comps], progress.global_step, hp
        (['model', 'lightning'], 8, {'lightning_hyper_parameters': {'lr': 0.1}})
    """
    sd = checkpoint.get("state_dict")
    if not isinstance(sd, Mapping):
        raise InvalidArgumentError(f"a Lightning checkpoint dict needs a 'state_dict' mapping of tensors, got keys "
                                   f"{sorted(map(str, checkpoint))[:8]}: pass what Trainer.save_checkpoint builds")
    hp = checkpoint.get("hyper_parameters")
    hp_json = None
    if hp is not None:
        try:
            enc = encode(hp, "hyper_parameters")
        except UnsupportedStateError as err:
            raise UnsupportedStateError(err.where, err.value_type, _HPARAMS_FIX) from err
        hp_json = enc.json if not enc.tensors else None
    rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    for k in rest:
        if not isinstance(k, str):
            raise UnsupportedStateError(f"the Lightning checkpoint key {k!r}", type(k).__name__,
                                        "use string keys in on_save_checkpoint")  # fmt: skip
    enc = encode(rest, LIGHTNING_COMPONENT)
    version = str(checkpoint.get("pytorch-lightning_version", "unknown"))
    model = model_component(_MODEL, sd, adapter="plain", type_name=_MODULE_TYPE, meta={"lightning_version": version})
    model.meta["key_order"] = list(sd)  # the state dict's own order, aliases included, restored on export
    lightning = Captured(LIGHTNING_COMPONENT, "value", "lightning.checkpoint", enc.json, enc.tensors,
                         {k: "state" for k in enc.tensors}, meta={"lightning_version": version})  # fmt: skip
    progress = Progress(epoch=_count(checkpoint.get("epoch")), global_step=_count(checkpoint.get("global_step")))
    hparams = {} if hp_json is None else {"lightning_hyper_parameters": hp_json}
    return [model, lightning], progress, hparams


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def to_lightning(r: Repository, manifest: Manifest, component: str | None = None) -> dict[str, Any]:
    """The Lightning checkpoint dict of checkpoint ``manifest``: the stored dict when the ckptkit Lightning plugin
    saved it, else one built from its model, optimizers, schedulers and progress.

    Raises:
        InvalidArgumentError: the checkpoint holds no model (or several and ``component`` names none of them), no
            optimizer, or progress that does not say where in an epoch it stopped.
    """
    comp = model_name(manifest, component, "a Lightning .ckpt needs the LightningModule's weights (save the module "
                                            "itself, e.g. {'model': module})")  # fmt: skip
    names = [comp, *(n for n, c in manifest.components.items() if c.kind in ("optimizer", "scheduler", "grad_scaler"))]
    if LIGHTNING_COMPONENT in manifest.components and comp == _MODEL:
        names.append(LIGHTNING_COMPONENT)
    tensors = load_tensors(r, manifest, names)
    out: dict[str, Any] = {}
    if LIGHTNING_COMPONENT in names:
        c = manifest.components[LIGHTNING_COMPONENT]
        rest = decode(c.state, tensors[LIGHTNING_COMPONENT], f"component {LIGHTNING_COMPONENT!r} of {manifest.name}")
        if not isinstance(rest, dict):
            raise InvalidArgumentError(f"component {LIGHTNING_COMPONENT!r} of {manifest.name} is not a Lightning "
                                       "checkpoint dict: export it with format='model'")  # fmt: skip
        out.update(rest)
        out["state_dict"] = _state_dict(manifest, comp, tensors[comp])
        return out
    return _build(manifest, comp, tensors)


def _state_dict(manifest: Manifest, comp: str, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    c = manifest.components[comp]
    aliases = resolve_aliases(set(stored), c.aliases, f"component {comp!r} of {manifest.name}")
    full = {**stored, **{a: stored[t] for a, t in aliases.items()}}
    order = c.meta.get("key_order")
    if isinstance(order, list) and sorted(map(str, order)) == sorted(full):
        return {str(k): full[str(k)] for k in order}
    return full


def _build(manifest: Manifest, comp: str, tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    where = f"checkpoint {manifest.name}"
    opts = [n for n, c in manifest.components.items() if c.kind == "optimizer"]
    if not opts:
        raise InvalidArgumentError(f"cannot export {where} to a Lightning .ckpt that resumes training: it has no "
                                   "optimizer component (Lightning would resume with a fresh optimizer); save the "
                                   "optimizer with the model ({'model': module, 'optimizer': opt}), or export the "
                                   "model alone with format='model'")  # fmt: skip
    p = manifest.progress
    out: dict[str, Any] = {
        "epoch": p.epoch if p.step_in_epoch else max(p.epoch - 1, 0),  # Lightning's: the epoch in progress
        "global_step": p.global_step,
        "pytorch-lightning_version": _lightning_version(),
        "state_dict": _state_dict(manifest, comp, tensors[comp]),
        "loops": _loops(p, where),
        "callbacks": {},
        "optimizer_states": [_positional(decode(manifest.components[n].state, tensors[n], f"{where} {n}"), n, where)
                             for n in opts],
        "lr_schedulers": [decode(c.state, tensors[n], f"{where} {n}") for n, c in manifest.components.items()
                          if c.kind == "scheduler"],
    }
    scalers = [n for n, c in manifest.components.items() if c.kind == "grad_scaler"]
    if scalers:
        out["MixedPrecision"] = decode(manifest.components[scalers[0]].state, tensors[scalers[0]], where)
    hp = manifest.hparams.get("lightning_hyper_parameters")
    if isinstance(hp, dict):
        out["hyper_parameters"] = decode(hp, {}, f"{where} hparams")
    return out


def _positional(state: Any, name: str, where: str) -> dict[str, Any]:
    """An optimizer state keyed by parameter name -> ``optimizer.state_dict()`` (keyed by position)."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise InvalidArgumentError(f"{where}: optimizer component {name!r} is not an optimizer state dict")
    index: dict[Any, int] = {}
    groups = []
    for g in state["param_groups"]:
        ids = []
        for pname in g["params"]:
            index[pname] = len(index)
            ids.append(index[pname])
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    return {"state": {index[k]: v for k, v in state.get("state", {}).items() if k in index}, "param_groups": groups}


def _loops(p: Progress, where: str) -> dict[str, Any]:
    """The ``loops`` entry Lightning 2.x restores ``trainer.current_epoch`` / ``global_step`` from.

    ``step_in_epoch == 0``: ``epoch`` epochs are finished (what Lightning writes at the end of an epoch), and the
    next fit starts a fresh epoch. Otherwise ``step_in_epoch`` batches of epoch ``epoch`` are done (what Lightning
    writes at ``on_train_batch_end``): Lightning restarts that epoch's data (and warns that this is not exact).
    One optimizer step per batch (no gradient accumulation).
    """
    g, b = p.global_step, p.step_in_epoch
    if b == 0 and p.epoch == 0 and g > 0:
        raise InvalidArgumentError(f"cannot export {where} to a Lightning .ckpt: its progress says {g} steps in "
                                   "epoch 0 without saying where in an epoch it stopped; save it with "
                                   "progress=Progress(epoch=<finished epochs>, global_step=...) or with "
                                   "step_in_epoch=<batches done in the current epoch>")  # fmt: skip

    def four(n: int, done: int) -> dict[str, int]:
        return {"ready": n, "completed": done, "started": n, "processed": n}

    if b:  # saved at a batch end, mid-epoch
        epochs = {"ready": p.epoch + 1, "completed": p.epoch, "started": p.epoch + 1, "processed": p.epoch}
        total, current, stepped = four(g, g - 1), four(b, b - 1), g - 1
    else:  # at the end of epoch `epoch - 1`
        e = p.epoch
        epochs = {"ready": e, "completed": max(e - 1, 0), "started": e, "processed": e}
        total, current, stepped = four(g, g), four(g, g), g
    two = {"ready": total["ready"], "completed": total["ready"]}
    two_cur = {"ready": current["ready"], "completed": current["ready"]}
    three = {**two, "started": total["ready"]}
    three_cur = {**two_cur, "started": current["ready"]}
    zero4, zero2 = four(0, 0), {"ready": 0, "completed": 0}
    idle = {"total": zero4, "current": zero4, "is_last_batch": False}
    fit = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": stepped},
        "epoch_loop.batch_progress": {"total": total, "current": current, "is_last_batch": not b and g > 0},
        "epoch_loop.scheduler_progress": {"total": two, "current": two_cur},
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
            "step": {"total": two, "current": two_cur}, "zero_grad": {"total": three, "current": three_cur}}},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": {"total": zero2, "current": zero2},
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": idle,
        "epoch_progress": {"total": epochs, "current": dict(epochs)},
    }  # fmt: skip
    other = {"state_dict": {}, "batch_progress": idle}
    return {"fit_loop": fit, "validate_loop": other, "test_loop": dict(other),
            "predict_loop": {"state_dict": {}, "batch_progress": {"total": zero4, "current": zero4}}}  # fmt: skip


def _lightning_version() -> str:
    for dist in ("lightning", "pytorch-lightning"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise MissingDependencyError("exporting a checkpoint saved without Lightning to a Lightning .ckpt needs the "
                                 "Lightning version it is written for: pip install lightning")  # fmt: skip


def _check_loadable(value: Any, path: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would not read back (numpy values, sets)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_loadable(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_loadable(k, f"{path}<key>")
            _check_loadable(v, f"{path}.{k}" if path else str(k))
        return
    kind = "numpy value" if isinstance(value, (np.ndarray, np.generic)) else type(value).__name__
    raise UnsupportedStateError(f"{path} of the Lightning checkpoint", kind,
                                "torch.load(weights_only=True) would refuse the .ckpt: store a tensor or plain "
                                "values there instead (e.g. torch.from_numpy(array))")  # fmt: skip


def export_lightning(r: Repository, manifest: Manifest, dest: str, component: str | None) -> list[str]:
    """Write checkpoint ``manifest`` as ``dest/<name>.ckpt`` (plus ``ckptkit.json``) for Lightning to resume.

    ``lightning.Trainer.fit(module, ckpt_path=file)`` resumes from it and ``torch.load(file, weights_only=True)``
    reads it. A checkpoint the ckptkit Lightning plugin saved becomes the dict Lightning saved; any other needs a
    model component holding the LightningModule's state dict, an optimizer and a progress that places it in an epoch.
    Called by :func:`ckptkit.interop.export.export` with ``format="lightning"``.

    Raises:
        InvalidArgumentError: what the checkpoint lacks for Lightning (the message says what).
        UnsupportedStateError: a stored value ``torch.load(weights_only=True)`` would not read (the key is named).

    Example::

        ckptkit.export("s3://bucket/run", "./for-lightning", "epoch_1-step_8", format="lightning")
        trainer.fit(module, ckpt_path="./for-lightning/epoch_1-step_8.ckpt")
    """
    ckpt = to_lightning(r, manifest, component)
    _check_loadable(ckpt, "")
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, f"{manifest.name}.ckpt")
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    from ckptkit.interop.export import PROVENANCE  # export imports this module by name: no cycle at import time

    prov = os.path.join(dest, PROVENANCE)
    comp = component or next(n for n, c in manifest.components.items() if c.kind == "model")
    with open(prov, "w") as f:
        json.dump({"checkpoint": manifest.id, "name": manifest.name, "url": r.url, "component": comp,
                   "format": "lightning"}, f, indent=2)  # fmt: skip
    return [path, prov]
