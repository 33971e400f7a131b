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

from ckptkit.adapter import get_adapter
from ckptkit.errors import UnsupportedStateError
from ckptkit.files import read_torch_file
from ckptkit.format import encode
from ckptkit.importers._common import (
    ImportFormatError,
    _Import,
    _int,
    _json_safe,
    _model_component,
    _qualname,
    _scheduler_type,
    _stateful_component,
    _tensor_dict,
)
from ckptkit.importers._optimizer import _check_optimizer_dict, _hf_groupings, _match_grouping, _optimizer_component
from ckptkit.importers._pickle import _load_torch
from ckptkit.schema import ComponentKind
from ckptkit.state import RNG, Captured

_HF_TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_hf_weights(imp: _Import, folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = set(os.listdir(folder))
    for index_name, loader in (("model.safetensors.index.json", load_file), ("pytorch_model.bin.index.json", None)):
        if index_name in files:
            with open(os.path.join(folder, index_name)) as f:
                index = json.load(f)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise ImportFormatError(f"{folder}/{index_name} has no 'weight_map'")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ImportFormatError(f"{folder}/{index_name}: 'weight_map' must map tensor names to file names")
            shards = sorted(set(weight_map.values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                    raise ImportFormatError(f"{folder}/{index_name} names a shard outside the folder: {shard!r}")
                p = os.path.join(folder, shard)
                part = dict(loader(p)) if loader else _tensor_dict(_load_torch(p), p)
                out.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
            absent = [k for k in weight_map if k not in out]
            if absent:
                raise ImportFormatError(f"{folder}: tensors listed in {index_name} are missing from their shards: "
                                        f"{absent[:5]}")  # fmt: skip
            return out
    if "model.safetensors" in files:
        return dict(load_file(os.path.join(folder, "model.safetensors")))
    if "pytorch_model.bin" in files:
        p = os.path.join(folder, "pytorch_model.bin")
        return _tensor_dict(_load_torch(p), p)
    raise ImportFormatError(f"{folder} has no weights ({', '.join(_HF_WEIGHTS)})")


def _hf_model(imp: _Import, folder: str) -> tuple[Captured, torch.nn.Module]:
    """The "model" component of an HF folder, with the HF adapter's own metadata (rebuilt from config.json on the
    meta device), and that skeleton model (for parameter names)."""
    import transformers

    with open(os.path.join(folder, "config.json")) as f:
        raw_config = json.load(f)
    if not isinstance(raw_config, dict):
        raise ImportFormatError(f"{folder}/config.json is not a JSON object")
    archs = raw_config.get("architectures") or []
    if not archs or not isinstance(archs[0], str):
        raise ImportFormatError(f"{folder}/config.json names no model class ('architectures'), so the model cannot be "
                                "rebuilt or exported; add it (e.g. [\"BertForSequenceClassification\"])")  # fmt: skip
    cls = getattr(transformers, archs[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ImportFormatError(f"transformers {transformers.__version__} has no class {archs[0]!r} (config.json "
                                "'architectures'); custom-code models are not imported")  # fmt: skip
    if raw_config.get("auto_map"):
        imp.notes.append("config.json has auto_map (custom code): ignored; the model is built from transformers' "
                         f"own {archs[0]}")  # fmt: skip
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)  # reads config.json only
    except (ValueError, KeyError, OSError) as err:
        raise ImportFormatError(f"{folder}/config.json: transformers cannot read it ({err})") from err
    try:
        with torch.device("meta"):  # no memory, no initialisation: only names, shapes and ties are needed
            skeleton = cls(config)
    except Exception as err:  # a model whose __init__ needs real tensors
        imp.notes.append(f"{archs[0]} could not be built on the meta device ({err}); built on the CPU instead")
        skeleton = cls(config)
    adapter = get_adapter("hf")
    live, meta = adapter.capture(skeleton)  # exactly what a save of this model records
    tensors = _read_hf_weights(imp, folder)
    # Tied weights: save_pretrained writes one of each tied pair; record the others as aliases, as a save does.
    tied: dict[int, list[str]] = {}
    for n, p in skeleton.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(n)
    extra_aliases: dict[str, str] = {}
    for group in tied.values():
        present = [n for n in group if n in tensors]
        for n in group:
            if n not in tensors and present:
                extra_aliases[n] = present[0]
    order = [k for k in live if k in tensors] + [k for k in tensors if k not in live]
    comp = _model_component("model", {k: tensors[k] for k in order}, "hf", meta, _qualname(cls), skeleton)
    for alias, target in extra_aliases.items():
        comp.aliases[alias] = comp.aliases.get(target, target)  # the target may itself be stored under another name
    missing = [k for k in live if k not in tensors and k not in comp.aliases]
    unexpected = [k for k in tensors if k not in live]
    if missing or unexpected:
        imp.notes.append(f"weights differ from {archs[0]} built from config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; a strict restore into that class will report them")  # fmt: skip
    imp.info["transformers_version"] = str(raw_config.get("transformers_version") or "unknown")
    return comp, skeleton


def _hf_files(imp: _Import, folder: str, used: set[str]) -> None:
    for fname in sorted(os.listdir(folder)):
        p = os.path.join(folder, fname)
        if not os.path.isfile(p):
            imp.skipped[fname] = "a folder: not read"
            continue
        imp.hash_file(p)
        if fname in used or fname.endswith(".safetensors") or fname in _HF_WEIGHTS or fname.startswith("pytorch_model"):
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


def _read_hf_pretrained(imp: _Import, _data: Any, model: torch.nn.Module | None) -> None:
    comp, _ = _hf_model(imp, imp.path)
    imp.components.append(comp)
    if model is not None:
        imp.notes.append("model= ignored: an HF folder's config.json says which model it holds")
    _hf_files(imp, imp.path, {"config.json"})


def _read_rng(imp: _Import, path: str) -> Captured | None:
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
    enc = encode(rng, RNG)
    return Captured(RNG, "rng", "process", enc.json, enc.tensors, {k: "state" for k in enc.tensors},
                    meta={"cuda": "cuda" in rng, "imported_from": fname})  # fmt: skip


def _read_hf_trainer(imp: _Import, _data: Any, model: torch.nn.Module | None) -> None:
    folder = imp.path
    comp, skeleton = _hf_model(imp, folder)
    imp.components.append(comp)
    if model is not None:
        imp.notes.append("model= ignored: the Trainer folder's config.json says which model it holds")
    used = {"config.json", "trainer_state.json"}
    opt_path = os.path.join(folder, "optimizer.pt")
    if os.path.isfile(opt_path):
        used.add("optimizer.pt")
        osd = _check_optimizer_dict(_load_torch(opt_path), opt_path)
        shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
        groups, how = _match_grouping(osd, _hf_groupings(skeleton), shapes, opt_path)
        imp.components.append(_optimizer_component("optimizer", osd, groups))
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
            sd = _load_torch(p)
            type_ = _scheduler_type(sd) if kind == "scheduler" else "torch.amp.grad_scaler.GradScaler"
            imp.components.append(_stateful_component(cname, kind, type_, sd))
    rng_path = os.path.join(folder, "rng_state.pth")
    if os.path.isfile(rng_path):
        rng = _read_rng(imp, rng_path)
        if rng is not None:
            imp.components.append(rng)
    per_rank = sorted(f for f in os.listdir(folder) if re.fullmatch(r"rng_state_\d+\.pth", f))
    for rank_file in per_rank:
        imp.skipped[rank_file] = "RNG state of one process of a multi-process run; ckptkit's rng is one process's"
    state_path = os.path.join(folder, "trainer_state.json")
    with open(state_path) as f:
        state = json.load(f)
    if not isinstance(state, dict):
        raise ImportFormatError(f"{state_path} is not a JSON object")
    step, epoch = _int(state.get("global_step")), state.get("epoch")
    imp.global_step = step or 0
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and math.isfinite(epoch):
        imp.epoch = math.floor(epoch)
    imp.info["progress"] = {
        "global_step": step, "epoch": epoch if isinstance(epoch, (int, float)) else None,
        "epoch_meaning": "trainer_state.json 'epoch' (fractional); progress.epoch is its floor",
    }  # fmt: skip
    dropped: list[str] = []
    imp.hparams["hf_trainer_state"] = _json_safe({k: v for k, v in state.items() if k != "log_history"},
                                                 "trainer_state", dropped)  # fmt: skip
    if isinstance(state.get("best_metric"), (int, float)):
        imp.metrics["best_metric"] = float(state["best_metric"])
    history = state.get("log_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        for k, v in history[-1].items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                imp.metrics[k] = float(v)
    _hf_files(imp, folder, used)
