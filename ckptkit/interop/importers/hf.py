"""HF formats: ``hf-pretrained`` (a ``save_pretrained`` folder) and ``hf-trainer`` (a ``Trainer`` ``checkpoint-N``
folder: the weights plus optimizer, scheduler, scaler, RNG and trainer state). ``transformers`` is imported only
when such a folder is read."""

from __future__ import annotations

import json
import math
import os
import random
import re
from typing import Any

import numpy as np
import torch

from ckptkit.errors import ImportFormatError, SourceNotFoundError, UnsupportedStateError
from ckptkit.interop.importers._common import ImportRecord, as_int, json_safe, scheduler_type, tensor_dict
from ckptkit.interop.importers._optimizer import check_optimizer_dict, hf_groupings, match_grouping
from ckptkit.interop.importers._pickle import load_torch
from ckptkit.interop.importers.registry import HF_WEIGHTS
from ckptkit.schema import ComponentKind
from ckptkit.state import RNG, Captured
from ckptkit.state.adapter import get_adapter
from ckptkit.state.capture import model_component, optimizer_component, state_component
from ckptkit.state.files import read_safetensors, read_torch_file

__all__ = ["read_hf_pretrained", "read_hf_trainer"]

_HF_TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json")
_RESAVE = "re-save the folder with save_pretrained (or Trainer.save_model)"


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ImportFormatError(f"{path} is not valid JSON ({err}): the file is damaged; {_RESAVE}") from err
    if not isinstance(data, dict):
        raise ImportFormatError(f"{path} is not a JSON object (it holds a {type(data).__name__}): {_RESAVE}")
    return data


def _read_hf_weights(folder: str) -> dict[str, torch.Tensor]:
    load_file = read_safetensors
    files = set(os.listdir(folder))
    for index_name, loader in (("model.safetensors.index.json", load_file), ("pytorch_model.bin.index.json", None)):
        if index_name in files:
            index = _read_json_object(os.path.join(folder, index_name))
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ImportFormatError(f"{folder}/{index_name} has no 'weight_map': {_RESAVE}")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ImportFormatError(f"{folder}/{index_name}: 'weight_map' must map tensor names to file names: "
                                        f"{_RESAVE}")  # fmt: skip
            shards = sorted(set(weight_map.values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                    raise ImportFormatError(f"{folder}/{index_name} names a shard outside the folder: {shard!r}; "
                                            f"ckptkit reads only files inside it: {_RESAVE}")  # fmt: skip
                p = os.path.join(folder, shard)
                if not os.path.isfile(p):
                    raise SourceNotFoundError(p, f"shard listed in {index_name}")
                part = dict(loader(p)) if loader else tensor_dict(load_torch(p), p)
                out.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
            absent = [k for k in weight_map if k not in out]
            if absent:
                raise ImportFormatError(f"{folder}: tensors listed in {index_name} are missing from their shards: "
                                        f"{absent[:5]}; copy the complete shards, or {_RESAVE}")  # fmt: skip
            return out
    if "model.safetensors" in files:
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    if "pytorch_model.bin" in files:
        p = os.path.join(folder, "pytorch_model.bin")
        return tensor_dict(load_torch(p), p)
    raise ImportFormatError(f"{folder} has no weights (none of {', '.join(HF_WEIGHTS)}): {_RESAVE}")


def _hf_model(imp: ImportRecord, folder: str) -> tuple[Captured, torch.nn.Module]:
    """The "model" component of an HF folder, with the HF adapter's own metadata (rebuilt from config.json on the
    meta device), and that skeleton model (for parameter names)."""
    import transformers

    raw_config = _read_json_object(os.path.join(folder, "config.json"))
    archs = raw_config.get("architectures") or []
    if not archs or not isinstance(archs[0], str):
        raise ImportFormatError(f"{folder}/config.json names no model class ('architectures'), so the model cannot be "
                                "rebuilt or exported; add it (e.g. [\"BertForSequenceClassification\"])")  # fmt: skip
    cls = getattr(transformers, archs[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ImportFormatError(f"transformers {transformers.__version__} has no class {archs[0]!r} ({folder}/"
                                "config.json 'architectures'); custom-code models are not imported: upgrade "
                                "transformers if the class is newer, or load the model with its own code and "
                                "ckptkit.save it")  # fmt: skip
    if raw_config.get("auto_map"):
        imp.notes.append("config.json has auto_map (custom code): ignored; the model is built from transformers' "
                         f"own {archs[0]}")  # fmt: skip
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)  # reads config.json only
    except (ValueError, KeyError, OSError) as err:
        raise ImportFormatError(f"{folder}/config.json: transformers {transformers.__version__} cannot read it "
                                f"({err}); upgrade transformers, or {_RESAVE}") from err  # fmt: skip
    try:
        with torch.device("meta"):  # no memory, no initialisation: only names, shapes and ties are needed
            skeleton = cls(config)
    except Exception as err:  # a model whose __init__ needs real tensors
        imp.notes.append(f"{archs[0]} could not be built on the meta device ({err}); built on the CPU instead")
        skeleton = cls(config)
    adapter = get_adapter("hf")
    live, meta = adapter.capture(skeleton)  # exactly what a save of this model records
    tensors = _read_hf_weights(folder)
    order = [k for k in live if k in tensors] + [k for k in tensors if k not in live]
    # save_pretrained writes one of each tied pair: the skeleton's ties make the others aliases, as a save does
    comp = model_component("model", {k: tensors[k] for k in order}, skeleton, adapter="hf", meta=meta)
    missing = [k for k in live if k not in tensors and k not in comp.aliases]
    unexpected = [k for k in tensors if k not in live]
    if missing or unexpected:
        imp.notes.append(f"weights differ from {archs[0]} built from config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; a strict restore into that class will report them")  # fmt: skip
    imp.info["transformers_version"] = str(raw_config.get("transformers_version") or "unknown")
    return comp, skeleton


def _hf_files(imp: ImportRecord, folder: str, used: set[str]) -> None:
    for fname in sorted(os.listdir(folder)):
        p = os.path.join(folder, fname)
        if not os.path.isfile(p):
            imp.skipped[fname] = "a folder: not read"
            continue
        imp.hash_file(p)
        if fname in used or fname.endswith(".safetensors") or fname in HF_WEIGHTS or fname.startswith("pytorch_model"):
            continue
        if fname in _HF_TRAINER_FILES or (fname.startswith("rng_state") and imp.fmt != "hf-trainer"):
            imp.skipped[fname] = "Trainer state: imported with format 'hf-trainer' only"
        elif fname == "training_args.bin":
            imp.skipped[fname] = ("a pickled transformers.TrainingArguments object: never unpickled (unpickling can "
                                  "run code); its values are not training state")  # fmt: skip
        elif fname.startswith("rng_state"):
            continue  # recorded by the RNG reader
        else:
            imp.skipped[fname] = "not model or training state (tokenizer, processor or generation files): not imported"


def read_hf_pretrained(imp: ImportRecord, _data: Any, model: torch.nn.Module | None) -> None:
    """Read the ``save_pretrained`` folder ``imp.path`` into ``imp``: the model, rebuilt from config.json."""
    comp, _ = _hf_model(imp, imp.path)
    imp.components.append(comp)
    if model is not None:
        imp.notes.append("model= ignored: an HF folder's config.json says which model it holds")
    _hf_files(imp, imp.path, {"config.json"})


def _read_rng(imp: ImportRecord, path: str) -> Captured | None:
    """HF's rng_state.pth as ckptkit's "rng" component, only when it maps exactly; else None (reason in skipped).

    HF saves ``np.random.get_state()`` (a numpy array), so the weights-only load allowlists exactly what a numpy
    array needs (the same four globals transformers itself allowlists to read this file)."""
    fname = os.path.basename(path)
    np_core: Any = getattr(np, "_core", None) or getattr(np, "core")  # noqa: B009 - numpy 1.x vs 2.x
    allow: list[Any] = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allow):
            data = read_torch_file(path)
    except UnsupportedStateError as err:
        imp.skipped[fname] = f"not read: {err}"
        return None
    if not isinstance(data, dict):
        imp.skipped[fname] = f"holds a {type(data).__name__}, not HF's dict of RNG states"
        return None
    other = sorted(set(map(str, data)) - {"python", "numpy", "cpu", "cuda"})
    if other:
        imp.skipped[fname] = (f"holds RNG state of {other}, which ckptkit's rng component (python, numpy, torch CPU, "
                              "CUDA devices) has no place for")  # fmt: skip
        return None
    try:
        random.Random().setstate(data["python"])
        np.random.RandomState().set_state(data["numpy"])
        ok = isinstance(data["cpu"], torch.Tensor) and data["cpu"].dtype == torch.uint8
    except (KeyError, TypeError, ValueError) as err:
        imp.skipped[fname] = f"not a valid python / numpy / torch RNG state ({err})"
        return None
    if not ok or np.asarray(data["numpy"][1]).dtype != np.uint32:
        imp.skipped[fname] = "not a valid torch CPU / numpy MT19937 RNG state"
        return None
    rng: dict[str, Any] = {"python": data["python"], "numpy": data["numpy"], "torch": data["cpu"]}
    if "cuda" in data:
        cuda = data["cuda"]
        if isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in cuda):
            rng["cuda"] = list(cuda)  # get_rng_state_all(): every device, by index (distributed Trainer)
        else:
            imp.skipped[fname] = (
                "holds the CUDA RNG state of one device (non-distributed Trainer: torch.cuda.get_rng_state() of the "
                "current device, whose index is not recorded); ckptkit's rng component holds every device by index, "
                "so the mapping would not be exact"
            )
            return None
    return state_component(RNG, "rng", "process", rng, meta={"cuda": "cuda" in rng, "imported_from": fname})


def read_hf_trainer(imp: ImportRecord, _data: Any, model: torch.nn.Module | None) -> None:
    """Read the Trainer ``checkpoint-N`` folder ``imp.path`` into ``imp``: the model (rebuilt from config.json),
    optimizer (named by the Trainer's parameter groups, checked), scheduler, grad scaler, RNG and trainer state."""
    folder = imp.path
    comp, skeleton = _hf_model(imp, folder)
    imp.components.append(comp)
    if model is not None:
        imp.notes.append("model= ignored: the Trainer folder's config.json says which model it holds")
    used = {"config.json", "trainer_state.json"}
    opt_path = os.path.join(folder, "optimizer.pt")
    if os.path.isfile(opt_path):
        used.add("optimizer.pt")
        osd = check_optimizer_dict(load_torch(opt_path), opt_path)
        shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
        groups, how = match_grouping(osd, hf_groupings(skeleton), shapes, opt_path)
        imp.components.append(optimizer_component("optimizer", osd, groups))
        imp.notes.append(f"optimizer: parameters named by {how} of {comp.type.rsplit('.', 1)[-1]} built from "
                         "config.json, checked against the saved state (group sizes, state shapes)")  # fmt: skip
    else:
        imp.notes.append("no optimizer.pt (saved with save_only_model?): optimizer state not imported")
    extras: list[tuple[str, str, ComponentKind]] = [("scheduler.pt", "scheduler", "scheduler"),
                                                    ("scaler.pt", "grad_scaler", "grad_scaler")]  # fmt: skip
    for fname, cname, kind in extras:
        p = os.path.join(folder, fname)
        if os.path.isfile(p):
            used.add(fname)
            sd = load_torch(p)
            type_ = scheduler_type(sd) if kind == "scheduler" else "torch.amp.grad_scaler.GradScaler"
            imp.components.append(state_component(cname, kind, type_, sd))
    rng_path = os.path.join(folder, "rng_state.pth")
    if os.path.isfile(rng_path):
        rng = _read_rng(imp, rng_path)
        if rng is not None:
            imp.components.append(rng)
    per_rank = sorted(f for f in os.listdir(folder) if re.fullmatch(r"rng_state_\d+\.pth", f))
    for rank_file in per_rank:
        imp.skipped[rank_file] = "RNG state of one process of a multi-process run; ckptkit's rng is one process's"
    state = _read_json_object(os.path.join(folder, "trainer_state.json"))
    step, epoch = as_int(state.get("global_step")), state.get("epoch")
    imp.global_step = step or 0
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and math.isfinite(epoch):
        imp.epoch = math.floor(epoch)
    imp.info["progress"] = {
        "global_step": step, "epoch": epoch if isinstance(epoch, (int, float)) else None,
        "epoch_meaning": "trainer_state.json 'epoch' (fractional); progress.epoch is its floor",
    }  # fmt: skip
    dropped: list[str] = []
    imp.hparams["hf_trainer_state"] = json_safe({k: v for k, v in state.items() if k != "log_history"},
                                                "trainer_state", dropped)  # fmt: skip
    if isinstance(state.get("best_metric"), (int, float)):
        imp.metrics["best_metric"] = float(state["best_metric"])
    history = state.get("log_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        for k, v in history[-1].items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                imp.metrics[k] = float(v)
    _hf_files(imp, folder, used)
