"""The ``lightning`` format: a Lightning ``.ckpt`` file."""

from __future__ import annotations

from typing import Any

import torch

from ckptkit.errors import ImportFormatError
from ckptkit.interop.importers._common import (
    ImportRecord,
    as_int,
    describe,
    json_safe,
    model_meta,
    scheduler_type,
    tensor_dict,
)
from ckptkit.interop.importers._optimizer import check_optimizer_dict, name_optimizer
from ckptkit.state.capture import model_component, state_component

__all__ = ["read_lightning"]


def read_lightning(imp: ImportRecord, data: Any, model: torch.nn.Module | None) -> None:
    """Read the Lightning ``.ckpt`` ``data`` (loaded from ``imp.path``) into ``imp``: the model, optimizers (named
    by ``model`` when given), LR schedulers, grad scaler, progress and hyperparameters."""
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise ImportFormatError(f"{imp.path} is not a Lightning checkpoint ({describe(data)}): pass the .ckpt that "
                                "Trainer.save_checkpoint or ModelCheckpoint wrote, or the format the file is "
                                "(import_from(format=...))")  # fmt: skip
    imp.hash_file(imp.path)
    tensors = tensor_dict(data["state_dict"], f"{imp.path} 'state_dict'")
    adapter, meta = model_meta(imp, "lightning", model, tensors)
    type_name = "lightning.pytorch.core.module.LightningModule" if model is None else None
    imp.components.append(model_component("model", tensors, model, adapter=adapter, meta=meta, type_name=type_name))
    for i, raw in enumerate(data.get("optimizer_states") or []):
        cname = "optimizer" if i == 0 else f"optimizer_{i}"
        osd = check_optimizer_dict(raw, f"{imp.path} 'optimizer_states'[{i}]")
        imp.components.append(name_optimizer(imp, cname, osd, f"{imp.path} optimizer_states[{i}]", model, tensors))
    for i, sd in enumerate(data.get("lr_schedulers") or []):
        cname = "scheduler" if i == 0 else f"scheduler_{i}"
        imp.components.append(state_component(cname, "scheduler", scheduler_type(sd), sd))
    for key in ("native_amp_scaling_state", "MixedPrecision", "scaler"):
        if isinstance(data.get(key), dict) and "scale" in data[key]:
            imp.components.append(state_component("grad_scaler", "grad_scaler", "torch.amp.grad_scaler.GradScaler",
                                                  data[key]))  # fmt: skip
            break
    epoch, step = as_int(data.get("epoch")), as_int(data.get("global_step"))
    imp.epoch, imp.global_step = epoch or 0, step or 0
    imp.info["progress"] = {"epoch": epoch, "global_step": step,
                            "epoch_meaning": "Lightning 'epoch' (trainer.current_epoch when saved), as is"}  # fmt: skip
    imp.info["lightning_version"] = str(data.get("pytorch-lightning_version", "unknown"))
    dropped: list[str] = []
    if "hyper_parameters" in data:
        imp.hparams["lightning_hyper_parameters"] = json_safe(data["hyper_parameters"], "hyper_parameters", dropped)
    if data.get("datamodule_hyper_parameters") is not None:
        dm = json_safe(data["datamodule_hyper_parameters"], "datamodule_hyper_parameters", dropped)
        imp.hparams["lightning_datamodule_hyper_parameters"] = dm
    if dropped:
        imp.skipped["hyper_parameters"] = f"values that are not JSON (tensors) at {dropped[:5]}: not recorded"
    if data.get("callbacks"):
        imp.skipped["callbacks"] = ("Lightning callback state (ModelCheckpoint, EarlyStopping ...): no ckptkit "
                                    "component; keep the .ckpt if you resume with Lightning")  # fmt: skip
    if data.get("loops"):
        imp.skipped["loops"] = "Lightning loop counters: progress is taken from 'epoch' and 'global_step'"
    known = {"state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step", "pytorch-lightning_version",
             "hyper_parameters", "hparams_name", "datamodule_hyper_parameters", "datamodule_hparams_name", "callbacks",
             "loops", "native_amp_scaling_state", "MixedPrecision", "scaler"}  # fmt: skip
    for key in data:
        if key not in known:
            imp.skipped[str(key)] = "not a Lightning entry ckptkit knows (added by on_save_checkpoint?): not imported"
