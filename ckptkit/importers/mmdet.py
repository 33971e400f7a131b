"""The ``mmdet`` format: an MMDetection / mmengine ``.pth`` (``meta`` + ``state_dict`` + ``optimizer``)."""

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


def _read_mmdet(imp: _Import, data: Any, model: torch.nn.Module | None) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise ImportFormatError(f"{imp.path} is not an mmengine checkpoint ({_describe(data)})")
    imp.hash_file(imp.path)
    meta_in: dict[str, Any] = data["meta"] if isinstance(data.get("meta"), dict) else {}
    tensors = _tensor_dict(data["state_dict"], f"{imp.path} 'state_dict'")
    adapter, meta, type_ = _plain_model_meta(imp, "mmengine", model, tensors)
    dataset_meta = meta_in.get("dataset_meta")
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        meta = {**meta, "labels": list(classes)}
    imp.components.append(_model_component("model", tensors, adapter, meta, type_, model))
    opt = data.get("optimizer")
    if isinstance(opt, dict):
        # OptimWrapper.state_dict(): the optimizer's state dict (+ 'loss_scaler' for AmpOptimWrapper); an
        # OptimWrapperDict: {name: that}.
        wrappers = {"optimizer": opt} if "param_groups" in opt else {f"optimizer_{k}": v for k, v in opt.items()}
        for cname, w in wrappers.items():
            if not isinstance(w, dict):
                continue
            scaler = w.get("loss_scaler")
            osd = _check_optimizer_dict({k: v for k, v in w.items() if k != "loss_scaler"}, f"{imp.path} {cname}")
            imp.components.append(_name_optimizer(imp, cname, osd, f"{imp.path} {cname}", model, {}))
            if isinstance(scaler, dict):
                imp.components.append(_stateful_component(f"grad_scaler{cname[9:]}", "grad_scaler",
                                                          "torch.amp.grad_scaler.GradScaler", scaler))  # fmt: skip
    schedulers = data.get("param_schedulers")
    if isinstance(schedulers, dict):  # one list per optimizer wrapper
        schedulers = [s for v in schedulers.values() if isinstance(v, list) for s in v]
    for i, sd in enumerate(schedulers or []):
        imp.components.append(_stateful_component("scheduler" if i == 0 else f"scheduler_{i}", "scheduler",
                                                  _scheduler_type(sd), sd))  # fmt: skip
    epoch, it = _int(meta_in.get("epoch")), _int(meta_in.get("iter"))
    imp.epoch, imp.global_step = epoch or 0, it or 0
    imp.info["progress"] = {"epoch": epoch, "iter": it, "epoch_meaning": (
        "mmengine meta 'epoch' / 'iter' as is (the runner saves epochs and iterations completed)")}  # fmt: skip
    dropped: list[str] = []
    imp.hparams["mmengine_meta"] = _json_safe(meta_in, "meta", dropped)
    if dropped:
        imp.skipped["meta"] = f"values that are not JSON at {dropped[:5]}: not recorded"
    imp.info["mmengine_version"] = str(meta_in.get("mmengine_version") or meta_in.get("mmengine") or "unknown")
    for key in data:
        if key not in ("meta", "state_dict", "optimizer", "param_schedulers"):
            imp.skipped[str(key)] = "not an mmengine checkpoint entry ckptkit knows (message_hub ...): not imported"
