"""The ``timm`` format: a timm training checkpoint (what ``timm.utils.CheckpointSaver`` writes). ``timm`` is imported
only when the model is rebuilt from ``arch``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.errors import ImportFormatError
from ckptkit.interop.importers._common import ImportRecord, as_int, describe, json_safe, tensor_dict
from ckptkit.interop.importers._optimizer import check_optimizer_dict, match_grouping, name_optimizer, timm_groupings
from ckptkit.state.adapter import find_adapter
from ckptkit.state.capture import model_component, optimizer_component, state_component

__all__ = ["read_timm"]


def _timm_skeleton(imp: ImportRecord, arch: str, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module | None:
    """``timm.create_model(arch, num_classes=<from the classifier weight>)`` on the meta device, or None."""
    import timm

    if not isinstance(arch, str) or not timm.is_model(arch):
        imp.notes.append(
            f"arch {arch!r} is not a timm model name (timm's CheckpointSaver records the model's class name when it "
            "has no args); weights recorded with the plain adapter; pass model= (a timm model) for timm metadata"
        )
        return None
    with torch.device("meta"):
        probe: Any = timm.create_model(arch, pretrained=False)
    classifier = (getattr(probe, "pretrained_cfg", None) or {}).get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    num_classes = 0
    for h in heads:
        w = tensors.get(f"{h}.weight")
        if w is not None and w.dim() >= 1:
            num_classes = int(w.shape[0])
            break
    with torch.device("meta"):
        skeleton: torch.nn.Module = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    live = skeleton.state_dict()
    missing = [k for k in live if k not in tensors]
    bad = [k for k, t in tensors.items() if k not in live or tuple(live[k].shape) != tuple(t.shape)]
    if missing or bad:
        imp.notes.append(
            f"state_dict does not fit timm.create_model({arch!r}, num_classes={num_classes}): missing {missing[:5]}, "
            f"unexpected or reshaped {bad[:5]}; recorded with the plain adapter"
        )
        return None
    return skeleton


def read_timm(imp: ImportRecord, data: Any, model: torch.nn.Module | None) -> None:
    """Read the timm training checkpoint ``data`` (loaded from ``imp.path``) into ``imp``: the model (rebuilt from
    ``arch`` when it is a timm model name, else ``model``'s), its EMA, the optimizer (named by timm's parameter
    groups, checked), grad scaler, progress, metric and train.py's ``args`` (as hyperparameters ``timm_args``)."""
    if not isinstance(data, dict) or not isinstance(data.get("state_dict", data.get("state_dict_ema")), dict):
        raise ImportFormatError(f"{imp.path} is not a timm training checkpoint ({describe(data)}): pass the file "
                                "timm's CheckpointSaver wrote, or the format the file is "
                                "(import_from(format=...))")  # fmt: skip
    imp.hash_file(imp.path)
    arch = data.get("arch")
    imp.info["arch"] = str(arch)
    main = "state_dict" if isinstance(data.get("state_dict"), dict) else "state_dict_ema"
    tensors = tensor_dict(data[main], f"{imp.path} '{main}'")
    skeleton = model if model is not None else _timm_skeleton(imp, str(arch), tensors)
    meta: dict[str, Any]
    if skeleton is not None:
        adapter = find_adapter(skeleton)
        aname, meta = adapter.name, adapter.capture(skeleton)[1]
    else:
        aname, meta = "plain", {"framework": "timm", "arch": str(arch)}
    imp.components.append(model_component("model", tensors, skeleton, adapter=aname, meta=meta))
    if main == "state_dict" and isinstance(data.get("state_dict_ema"), dict):
        ema = tensor_dict(data["state_dict_ema"], f"{imp.path} 'state_dict_ema'")
        imp.components.append(model_component("model_ema", ema, skeleton, adapter=aname, meta=meta))
    if "optimizer" in data:
        osd = check_optimizer_dict(data["optimizer"], f"{imp.path} 'optimizer'")
        if skeleton is not None:
            shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
            single = [n for n, p in skeleton.named_parameters() if p.requires_grad]
            cands = [*timm_groupings(skeleton), ("model.parameters() in one group", [single])]
            groups, how = match_grouping(osd, cands, shapes, f"{imp.path} 'optimizer'")
            imp.components.append(optimizer_component("optimizer", osd, groups))
            imp.notes.append(f"optimizer: parameters named by {how}, checked against the saved state")
        else:
            imp.components.append(name_optimizer(imp, "optimizer", osd, f"{imp.path} 'optimizer'", None, tensors))
    for key in ("amp_scaler", "scaler"):
        if isinstance(data.get(key), dict) and "scale" in data[key]:
            imp.components.append(state_component("grad_scaler", "grad_scaler", "torch.amp.grad_scaler.GradScaler",
                                                  data[key]))  # fmt: skip
            break
    epoch = as_int(data.get("epoch"))
    imp.epoch = epoch or 0
    version = as_int(data.get("version"))
    imp.info["progress"] = {
        "epoch": epoch, "version": version,
        "epoch_meaning": "timm 'epoch' as is: with version >= 2 the last completed epoch (timm resumes at epoch + 1)",
    }  # fmt: skip
    metric = data.get("metric")
    if isinstance(metric, (int, float, torch.Tensor)) and json_safe(metric, "metric", []) is not None:
        imp.metrics["metric"] = float(metric)
    args = data.get("args")
    if isinstance(args, dict):  # train.py's argparse.Namespace, read as plain data (a PlainObject)
        dropped: list[str] = []
        imp.hparams["timm_args"] = json_safe(dict(args), "args", dropped)
        if dropped:
            imp.skipped["args"] = f"values that are not JSON at {dropped[:5]}: not recorded"
    elif args is not None:
        imp.skipped["args"] = f"{describe(args)}, not timm train.py's argparse.Namespace: not recorded"
    if "saver" in data:
        imp.skipped["saver"] = "timm CheckpointSaver bookkeeping (file history, best metric): not training state"
    known = {"state_dict", "state_dict_ema", "optimizer", "epoch", "arch", "version", "metric", "saver", "amp_scaler",
             "scaler", "args"}  # fmt: skip
    for key in data:
        if key not in known:
            imp.skipped[str(key)] = "not a timm checkpoint entry ckptkit knows: not imported"
