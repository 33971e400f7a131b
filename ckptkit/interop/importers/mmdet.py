"""The ``mmdet`` format: an MMDetection / mmengine ``.pth`` (``meta`` + ``state_dict`` + ``optimizer``)."""

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
from ckptkit.state.foreign import MESSAGE_HUB, plain_state

__all__ = ["read_mmdet"]


def read_mmdet(imp: ImportRecord, data: Any, model: torch.nn.Module | None) -> None:
    """Read the mmengine checkpoint ``data`` (loaded from ``imp.path``) into ``imp``: the model (with the dataset's
    class names), optimizer wrappers (named by ``model`` when given), grad scalers, parameter schedulers
    (restorable into mmengine's own), the Runner's ``message_hub`` (restorable into a ``MessageHub``), progress and
    meta."""
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise ImportFormatError(f"{imp.path} is not an mmengine checkpoint ({describe(data)}): pass the .pth that "
                                "mmengine's Runner (CheckpointHook) wrote, or the format the file is "
                                "(import_from(format=...))")  # fmt: skip
    imp.hash_file(imp.path)
    meta_in: dict[str, Any] = data["meta"] if isinstance(data.get("meta"), dict) else {}
    tensors = tensor_dict(data["state_dict"], f"{imp.path} 'state_dict'")
    adapter, meta = model_meta(imp, "mmengine", model, tensors)
    dataset_meta = meta_in.get("dataset_meta")
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        meta = {**meta, "labels": list(classes)}
    imp.components.append(model_component("model", tensors, model, adapter=adapter, meta=meta))
    opt = data.get("optimizer")
    if isinstance(opt, dict):
        # OptimWrapper.state_dict(): the optimizer's state dict (+ 'loss_scaler' for AmpOptimWrapper); an
        # OptimWrapperDict: {name: that}.
        wrappers = {"optimizer": opt} if "param_groups" in opt else {f"optimizer_{k}": v for k, v in opt.items()}
        for cname, w in wrappers.items():
            if not isinstance(w, dict):
                continue
            scaler = w.get("loss_scaler")
            osd = check_optimizer_dict({k: v for k, v in w.items() if k != "loss_scaler"}, f"{imp.path} {cname}")
            imp.components.append(name_optimizer(imp, cname, osd, f"{imp.path} {cname}", model, {}))
            if isinstance(scaler, dict):
                imp.components.append(state_component(f"grad_scaler{cname[9:]}", "grad_scaler",
                                                      "torch.amp.grad_scaler.GradScaler", scaler))  # fmt: skip
    schedulers = data.get("param_schedulers")
    if isinstance(schedulers, dict):  # one list per optimizer wrapper
        schedulers = [s for v in schedulers.values() if isinstance(v, list) for s in v]
    for i, sd in enumerate(schedulers or []):
        # mmengine's ParamSchedulers (LinearLR, MultiStepLR ...) keep begin / end / by_epoch beside torch's keys
        mm = isinstance(sd, dict) and {"begin", "end", "by_epoch"} <= set(sd)
        kind = "mmengine.optim.scheduler.param_scheduler._ParamScheduler" if mm else scheduler_type(sd)
        imp.components.append(state_component("scheduler" if i == 0 else f"scheduler_{i}", "scheduler", kind, sd))
    hub = data.get("message_hub")
    if isinstance(hub, dict):  # MessageHub.state_dict(): HistoryBuffers read as plain data, numpy values
        imp.components.append(state_component("message_hub", "stateful", MESSAGE_HUB,
                                              plain_state(MESSAGE_HUB, hub)))  # fmt: skip
    epoch, it = as_int(meta_in.get("epoch")), as_int(meta_in.get("iter"))
    imp.epoch, imp.global_step = epoch or 0, it or 0
    imp.info["progress"] = {"epoch": epoch, "iter": it, "epoch_meaning": (
        "mmengine meta 'epoch' / 'iter' as is (the runner saves epochs and iterations completed)")}  # fmt: skip
    dropped: list[str] = []
    imp.hparams["mmengine_meta"] = json_safe(meta_in, "meta", dropped)
    if dropped:
        imp.skipped["meta"] = f"values that are not JSON at {dropped[:5]}: not recorded"
    imp.info["mmengine_version"] = str(meta_in.get("mmengine_version") or meta_in.get("mmengine") or "unknown")
    for key in data:
        if key not in ("meta", "state_dict", "optimizer", "param_schedulers", "message_hub"):
            imp.skipped[str(key)] = "not an mmengine checkpoint entry ckptkit knows: not imported"
