"""The ``lightning`` format: a Lightning ``.ckpt`` file."""

from __future__ import annotations

from typing import Any

import torch

from ckptkit.importers._common import (
    ImportFormatError,
    _describe,
    _Import,
    _int,
    _json_safe,
    _model_component,
    _plain_model_meta,
    _scheduler_type,
    _stateful_component,
    _tensor_dict,
)
from ckptkit.importers._optimizer import _check_optimizer_dict, _name_optimizer


def _read_lightning(imp: _Import, data: Any, model: torch.nn.Module | None) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise ImportFormatError(f"{imp.path} is not a Lightning checkpoint ({_describe(data)})")
    imp.hash_file(imp.path)
    tensors = _tensor_dict(data["state_dict"], f"{imp.path} 'state_dict'")
    adapter, meta, type_ = _plain_model_meta(imp, "lightning", model, tensors)
    if model is None:
        type_ = "lightning.pytorch.core.module.LightningModule"
    imp.components.append(_model_component("model", tensors, adapter, meta, type_, model))
    for i, raw in enumerate(data.get("optimizer_states") or []):
        cname = "optimizer" if i == 0 else f"optimizer_{i}"
        osd = _check_optimizer_dict(raw, f"{imp.path} 'optimizer_states'[{i}]")
        imp.components.append(_name_optimizer(imp, cname, osd, f"{imp.path} optimizer_states[{i}]", model, tensors))
    for i, sd in enumerate(data.get("lr_schedulers") or []):
        cname = "scheduler" if i == 0 else f"scheduler_{i}"
        imp.components.append(_stateful_component(cname, "scheduler", _scheduler_type(sd), sd))
    for key in ("native_amp_scaling_state", "MixedPrecision", "scaler"):
        if isinstance(data.get(key), dict) and "scale" in data[key]:
            imp.components.append(_stateful_component("grad_scaler", "grad_scaler", "torch.amp.grad_scaler.GradScaler",
                                                      data[key]))  # fmt: skip
            break
    epoch, step = _int(data.get("epoch")), _int(data.get("global_step"))
    imp.epoch, imp.global_step = epoch or 0, step or 0
    imp.info["progress"] = {"epoch": epoch, "global_step": step,
                            "epoch_meaning": "Lightning 'epoch' (trainer.current_epoch when saved), as is"}  # fmt: skip
    imp.info["lightning_version"] = str(data.get("pytorch-lightning_version", "unknown"))
    dropped: list[str] = []
    if "hyper_parameters" in data:
        imp.hparams["lightning_hyper_parameters"] = _json_safe(data["hyper_parameters"], "hyper_parameters", dropped)
    if data.get("datamodule_hyper_parameters") is not None:
        dm = _json_safe(data["datamodule_hyper_parameters"], "datamodule_hyper_parameters", dropped)
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
