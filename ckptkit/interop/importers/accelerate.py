"""The ``accelerate`` format: a folder written by ``accelerate.Accelerator.save_state``.

What such a folder holds, and what becomes of it (the component names are those
:class:`ckptkit.integrations.accelerate.AcceleratorCheckpoint` saves, so an imported folder resumes through it):

- ``model.safetensors`` / ``model_1.safetensors`` ... (or ``pytorch_model.bin`` / ``pytorch_model_1.bin``):
  ``model``, ``model_1`` ...
- ``optimizer.bin`` / ``optimizer_1.bin`` ...: ``optimizer``, ``optimizer_1`` ..., keyed by parameter name: by the
  ``model=`` given (checked against every saved state shape), else by order when that names them with certainty,
  else by position (a note says so).
- ``scheduler.bin`` ...: ``scheduler``, ``scheduler_1`` ...; ``scaler.pt``: ``grad_scaler``.
- ``random_states_<p>.pkl`` (one per process): ``rng`` from process 0 (python, numpy, torch CPU, and CUDA when saved
  for every device), ``rng_process_<p>`` values for the others; accelerate's ``step`` counter as the ``accelerator``
  component; the process count in ``source["processes"]``.
- ``custom_checkpoint_<i>.pkl`` (objects given to ``register_for_checkpointing``): ``custom_checkpoint_<i>``, a
  stateful component, when its state is tensors and plain values.
- ``dl_state_dict.bin`` ... (a ``use_stateful_dataloader`` loader's state): ``dl_state_dict`` ..., when plain data.
  ``sampler.bin`` is a pickled ``SeedableRandomSampler`` object: never unpickled, listed in ``source["skipped"]``.

Files are read with :func:`~ckptkit.interop.importers._pickle.load_torch` (``torch.load(weights_only=True)``); the
random-state files additionally allow exactly the numpy globals an ``np.random.get_state()`` array needs (the ones
accelerate itself allows). A file that needs any other object is skipped with the reason, never executed.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np
import torch

from ckptkit.errors import ImportFormatError, UnsupportedStateError
from ckptkit.interop.importers._common import ImportRecord, model_meta, scheduler_type, tensor_dict
from ckptkit.interop.importers._optimizer import check_optimizer_dict, name_optimizer
from ckptkit.interop.importers._pickle import load_torch
from ckptkit.schema import ComponentKind
from ckptkit.state import RNG
from ckptkit.state.capture import model_component, state_component
from ckptkit.state.files import read_safetensors

__all__ = ["ACCELERATOR", "read_accelerate"]

ACCELERATOR = "accelerator"
"""Name of the component that holds accelerate's own counters (``{"step": Accelerator.step}``)."""

_RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")
_NUMBERED = re.compile(r"(?P<base>[a-z_]+?)(?:_(?P<i>\d+))?\.(?P<ext>safetensors|bin|pkl)")
_RESAVE = "Re-save it with Accelerator.save_state, or load it where you trust its source and save it with ckptkit"
_OTHER_DEVICES = ("torch_xpu_manual_seed", "torch_mlu_manual_seed", "torch_sdaa_manual_seed", "torch_musa_manual_seed",
                  "torch_hpu_manual_seed", "torch_neuron_manual_seed", "xm_seed")  # fmt: skip


def _numbered(files: list[str], base: str, exts: tuple[str, ...]) -> dict[int, str]:
    """``{index: file}`` for ``base.ext``, ``base_1.ext`` ... (accelerate's names for the i-th object of a kind)."""
    out: dict[int, str] = {}
    for f in files:
        m = _NUMBERED.fullmatch(f)
        if m and m["base"] == base and m["ext"] in exts:
            out[int(m["i"] or 0)] = f
    return dict(sorted(out.items()))


def _name(kind: str, i: int) -> str:
    return kind if i == 0 else f"{kind}_{i}"


def _numpy_globals() -> list[Any]:
    """What ``np.random.get_state()``'s array needs to unpickle: exactly what accelerate's own ``load`` allows."""
    np_core: Any = getattr(np, "_core", None) or getattr(np, "core")  # noqa: B009 - numpy 1.x vs 2.x
    return [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load(imp: ImportRecord, folder: str, fname: str, numpy: bool = False) -> Any | None:
    """A file's content, or None when it needs unpickling an object (the reason goes to ``imp.skipped``)."""
    path = os.path.join(folder, fname)
    try:
        if numpy:
            with torch.serialization.safe_globals(_numpy_globals()):
                return load_torch(path, _RESAVE)
        return load_torch(path, _RESAVE)
    except UnsupportedStateError as err:  # RefusedPickleError: names the class and the entry; nothing was run
        imp.skipped[fname] = f"not imported: {err}"
        return None


def _weights(imp: ImportRecord, folder: str, files: list[str]) -> dict[int, tuple[str, dict[str, torch.Tensor]]]:
    safe = _numbered(files, "model", ("safetensors",))
    bins = _numbered(files, "pytorch_model", ("bin",))
    out: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
    for i in sorted(set(safe) | set(bins)):
        if i in safe:
            fname = safe[i]
            out[i] = fname, read_safetensors(os.path.join(folder, fname))
        else:
            fname = bins[i]
            out[i] = fname, tensor_dict(load_torch(os.path.join(folder, fname), _RESAVE), os.path.join(folder, fname))
        if i in safe and i in bins:
            imp.skipped[bins[i]] = f"the same model's weights as {safe[i]}, which was imported"
    return out


def _rng(imp: ImportRecord, fname: str, data: Any) -> tuple[dict[str, Any], int | None] | None:
    """One process's random states as ckptkit's rng state, and accelerate's step counter; None when they do not map
    exactly (the reason goes to ``imp.skipped``)."""
    if not isinstance(data, dict):
        imp.skipped[fname] = f"holds a {type(data).__name__}, not accelerate's dict of random states"
        return None
    others = sorted(k for k in map(str, data) if k in _OTHER_DEVICES)
    if others:
        imp.skipped[fname] = (f"holds RNG state of {others} (XPU, MLU, HPU, XLA ... devices), which ckptkit's rng "
                              "component (python, numpy, torch CPU, CUDA devices) has no place for")  # fmt: skip
        return None
    try:
        python, numpy_state, cpu = data["random_state"], data["numpy_random_seed"], data["torch_manual_seed"]
        random.Random().setstate(python)
        np.random.RandomState().set_state(numpy_state)
        torch.Generator().set_state(cpu)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        imp.skipped[fname] = f"not a valid python / numpy / torch random state ({type(err).__name__}: {err})"
        return None
    if np.asarray(numpy_state[1]).dtype != np.uint32:
        imp.skipped[fname] = "its numpy state is not an MT19937 state of uint32 words"
        return None
    rng: dict[str, Any] = {"python": python, "numpy": numpy_state, "torch": cpu}
    if "torch_cuda_manual_seed" in data:
        cuda = data["torch_cuda_manual_seed"]  # torch.cuda.get_rng_state_all(): every device, by index
        if not (isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                        for t in cuda)):  # fmt: skip
            imp.skipped[fname] = "its CUDA state is not torch.cuda.get_rng_state_all()'s list of uint8 tensors"
            return None
        rng["cuda"] = list(cuda)
    step = data.get("step")
    return rng, step if isinstance(step, int) and not isinstance(step, bool) else None


def read_accelerate(imp: ImportRecord, _data: Any, model: torch.nn.Module | None) -> None:
    """Read the ``Accelerator.save_state`` folder ``imp.path`` into ``imp``: models, optimizers (named by ``model``
    when given), schedulers, grad scaler, every process's random states, registered objects and data-loader state.

    Raises:
        ImportFormatError: the folder holds no model weights, or a file is not what its name says.
        OptimizerMappingError: ``model`` is given and the optimizer state does not fit its parameters.
    """
    folder = imp.path
    files = sorted(os.listdir(folder))
    used: set[str] = set()
    for fname in files:
        p = os.path.join(folder, fname)
        if os.path.isfile(p):
            imp.hash_file(p)
        else:
            imp.skipped[fname] = ("a folder: not read (FSDP / DeepSpeed / Megatron sharded state; import it with "
                                  "format 'dcp' when it is a torch.distributed.checkpoint folder)")  # fmt: skip
            used.add(fname)
    weights = _weights(imp, folder, files)
    if not weights:
        raise ImportFormatError(f"{folder} has no model weights (model.safetensors, model_1.safetensors ... or "
                                f"pytorch_model.bin ...): {_RESAVE[0].lower()}{_RESAVE[1:]}")  # fmt: skip
    models: dict[int, dict[str, torch.Tensor]] = {}
    for i, (fname, read) in weights.items():
        used.add(fname)
        given = model if i == 0 else None
        tensors = read
        if given is not None:  # the model's own order (safetensors files list tensors sorted by name)
            tensors = {**{k: read[k] for k in given.state_dict() if k in read}, **read}
        adapter, meta = model_meta(imp, "accelerate", given, tensors)
        type_name = None if given is not None else "torch.nn.Module"
        imp.components.append(model_component(_name("model", i), tensors, given, adapter=adapter, meta=meta,
                                              type_name=type_name))  # fmt: skip
        models[i] = tensors
    if model is not None and len(weights) > 1:
        imp.notes.append("model= names model (model.safetensors) and optimizer; the other models are recorded "
                         "with adapter 'plain'")  # fmt: skip
    for i, fname in _numbered(files, "optimizer", ("bin",)).items():
        used.add(fname)
        where = os.path.join(folder, fname)
        osd = check_optimizer_dict(load_torch(where, _RESAVE), where)
        # By order only with one model saved by torch.save (a dict in parameter order): safetensors files list
        # tensors sorted by name, and which model an optimizer of several belongs to, the folder does not say.
        by_order = len(models) == 1 and weights[min(weights)][0].endswith(".bin")
        imp.components.append(name_optimizer(imp, _name("optimizer", i), osd, where, model if i == 0 else None,
                                             models[min(models)], order_is_parameter_order=by_order))  # fmt: skip
    extras: list[tuple[str, str, ComponentKind]] = [("scheduler", "scheduler", "scheduler"),
                                                    ("dl_state_dict", "dl_state_dict", "stateful")]  # fmt: skip
    for base, cname, kind in extras:
        for i, fname in _numbered(files, base, ("bin",)).items():
            used.add(fname)
            _component(imp, fname, _load(imp, folder, fname), _name(cname, i), kind)
    for i, fname in _numbered(files, "custom_checkpoint", ("pkl",)).items():
        used.add(fname)
        _component(imp, fname, _load(imp, folder, fname), f"custom_checkpoint_{i}", "stateful")
    if "scaler.pt" in files:
        used.add("scaler.pt")
        _component(imp, "scaler.pt", _load(imp, folder, "scaler.pt"), "grad_scaler", "grad_scaler")
    for fname in _numbered(files, "sampler", ("bin",)).values():
        used.add(fname)
        if fname not in imp.skipped:
            imp.skipped[fname] = ("accelerate writes a pickled SeedableRandomSampler object here: never opened "
                                  "(unpickling can run code), so the sampler's data order is not imported")  # fmt: skip
    _read_rngs(imp, folder, files, used)
    for fname in files:
        if fname not in used and fname not in imp.skipped:
            imp.skipped[fname] = "not a file Accelerator.save_state writes: not imported"
    imp.info["progress"] = {"global_step": None, "epoch": None,
                            "meaning": "save_state records no training step or epoch (progress is 0); accelerate's "
                                       "gradient-accumulation counter Accelerator.step is in the 'accelerator' "
                                       "component"}  # fmt: skip


def _component(imp: ImportRecord, fname: str, data: Any, cname: str, kind: ComponentKind) -> None:
    if data is None:
        return  # skipped, with the reason
    if kind == "scheduler":
        type_ = scheduler_type(data)
    elif kind == "grad_scaler":
        type_ = "torch.amp.grad_scaler.GradScaler"
    else:
        type_ = "accelerate registered object" if cname.startswith("custom") else "accelerate data-loader state"
    try:
        imp.components.append(state_component(cname, kind, type_, data))
    except UnsupportedStateError as err:
        imp.skipped[fname] = f"not imported: {err}"


def _read_rngs(imp: ImportRecord, folder: str, files: list[str], used: set[str]) -> None:
    by_process = sorted((int(m[1]), f) for f in files if (m := _RNG_FILE.fullmatch(f)))
    imp.info["processes"] = len(by_process)
    step: int | None = None
    for process, fname in by_process:
        used.add(fname)
        data = _load(imp, folder, fname, numpy=True)
        mapped = _rng(imp, fname, data) if data is not None else None
        if mapped is None:
            continue
        rng, got_step = mapped
        meta = {"cuda": "cuda" in rng, "imported_from": fname, "process": process}
        if process == 0:
            imp.components.append(state_component(RNG, "rng", "process", rng, meta=meta))
            step = got_step
        else:
            imp.components.append(state_component(f"rng_process_{process}", "value", "process", rng, meta=meta))
    if by_process and by_process[0][0] != 0:
        imp.notes.append("no random_states_0.pkl: the rng component is left out; other processes' states are kept as "
                         "rng_process_<p> values")  # fmt: skip
    if len(by_process) > 1:
        imp.notes.append(f"{len(by_process)} processes' random states: process 0's is the rng component, restored by "
                         "ckptkit.restore; the others are rng_process_<p> values (RestoreResult.values)")  # fmt: skip
    if step is not None:
        imp.components.append(state_component(ACCELERATOR, "stateful", "accelerate.Accelerator", {"step": step}))
