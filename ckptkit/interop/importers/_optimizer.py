"""Optimizer state keyed by parameter name: the checks that a grouping of parameter names fits the saved state
(group sizes, per-parameter state shapes), the groupings training scripts commonly use (plain, HF Trainer's decay /
no-decay, timm's optimizer factory), naming by order without a model, and the positional fallback."""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckptkit.errors import ImportFormatError, OptimizerMappingError
from ckptkit.interop.importers._common import ImportRecord
from ckptkit.state import Captured
from ckptkit.state.capture import optimizer_component, param_names, positional_name

__all__ = ["Grouping", "check_optimizer_dict", "hf_groupings", "match_grouping", "name_optimizer", "timm_groupings"]

Grouping = list[list[str]]
"""Parameter names per optimizer parameter group, in the order the groups list them."""

_NOT_OPTIMIZER_FIX = ("import without it (move the file or entry away), or re-save it as optimizer.state_dict() "
                      "(a dict of 'state' and 'param_groups', each group with its 'params' list)")  # fmt: skip


def check_optimizer_dict(osd: Any, where: str) -> dict[str, Any]:
    """``osd`` as an optimizer state dict (``state`` and ``param_groups``, each group with ``params``).

    Raises:
        ImportFormatError: it is not one.
    """
    if not (isinstance(osd, dict) and isinstance(osd.get("state"), dict) and isinstance(osd.get("param_groups"), list)):
        raise ImportFormatError(f"{where} is not an optimizer state dict (expected 'state' and 'param_groups'): "
                                f"{_NOT_OPTIMIZER_FIX}")  # fmt: skip
    for g in osd["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise ImportFormatError(f"{where}: a param group without a 'params' list: {_NOT_OPTIMIZER_FIX}")
    return osd


def _positional(osd: dict[str, Any]) -> Grouping:
    """Names by position (what ckptkit uses for parameters it cannot name): ``param_groups[g][i]``."""
    return [[positional_name(g, i) for i in range(len(pg["params"]))] for g, pg in enumerate(osd["param_groups"])]


def _check_grouping(osd: dict[str, Any], groups: Grouping, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``groups`` (parameter names per group) does not fit the saved optimizer state, or None when it fits:
    same number of groups, same group sizes, and every per-parameter state tensor (``exp_avg``, ``momentum_buffer``
    ...) shaped like the parameter it is assigned to."""
    pgs = osd["param_groups"]
    if len(pgs) != len(groups):
        return f"{len(groups)} parameter group(s), the file has {len(pgs)}"
    for g, (pg, names) in enumerate(zip(pgs, groups, strict=True)):
        if len(pg["params"]) != len(names):
            return f"group {g} has {len(names)} parameters, the file's has {len(pg['params'])}"
    index = {pid: n for pg, names in zip(pgs, groups, strict=True) for pid, n in zip(pg["params"], names, strict=True)}
    for pid, st in osd["state"].items():
        n = index.get(pid)
        if n is None:
            return f"the file has state for parameter {pid!r}, which no group lists"
        shape = shapes.get(n)
        if shape is None:
            return f"{n} is not a parameter of the model"
        if not isinstance(st, dict):
            return f"state of parameter {pid!r} is not a dict"
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != shape:
                return f"{n}: its {k} has shape {list(v.shape)}, the parameter {list(shape)}"
    return None


def match_grouping(
    osd: dict[str, Any], candidates: list[tuple[str, Grouping]], shapes: Mapping[str, tuple[int, ...]], where: str
) -> tuple[Grouping, str]:
    """The one candidate grouping (label, names per group) that fits the saved state, and its label.

    Raises:
        OptimizerMappingError: none fits, or several that name the parameters differently do; nothing is guessed.
    """
    fits: list[tuple[str, Grouping]] = []
    reasons = []
    for label, groups in candidates:
        why = _check_grouping(osd, groups, shapes)
        if why is None:
            if all(groups != g for _, g in fits):
                fits.append((label, groups))
        else:
            reasons.append(f"{label}: {why}")
    if len(fits) == 1:
        return fits[0][1], fits[0][0]
    sizes = [len(g["params"]) for g in osd["param_groups"]]
    if not fits:
        raise OptimizerMappingError(
            f"cannot name the parameters of the optimizer state in {where} (groups of {sizes} parameters): no way "
            f"the model's parameters can be grouped checks out against the saved state ({'; '.join(reasons)}); "
            "refusing to guess. Without the optimizer state (move the file or entry away) the rest imports; or save "
            "the optimizer keyed by parameter name (torch.distributed.checkpoint.state_dict.get_optimizer_state_dict)"
        )
    raise OptimizerMappingError(
        f"the optimizer state in {where} (groups of {sizes} parameters) fits several parameter orders "
        f"({', '.join(label for label, _ in fits)}), which name the parameters differently; refusing to guess. "
        "Without the optimizer state (move the file or entry away) the rest imports; or save the optimizer keyed by "
        "parameter name (torch.distributed.checkpoint.state_dict.get_optimizer_state_dict)"
    )


def _model_groupings(model: torch.nn.Module, osd: dict[str, Any]) -> list[tuple[str, Grouping]]:
    """Ways a training script commonly groups a model's parameters, checked against the file by the caller."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out: list[tuple[str, Grouping]] = [("model.parameters() in one group", [names]),
                                       ("one group per parameter", [[n] for n in names])]  # fmt: skip
    sizes = [len(g["params"]) for g in osd["param_groups"]]
    if sum(sizes) == len(names) and len(sizes) > 1:
        chunks, at = [], 0
        for s in sizes:
            chunks.append(names[at : at + s])
            at += s
        out.append(("consecutive slices of model.parameters()", chunks))
    out += hf_groupings(model)
    out += timm_groupings(model)
    return out


def _infer_by_order(osd: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Grouping | None:
    """Without a model: when the optimizer has one group (built from ``model.parameters()``), its parameters are the
    state dict's floating-point tensors in order, minus buffers and frozen parameters. Accept the naming only if
    exactly one choice of those tensors fits every saved per-parameter state shape."""
    pgs = osd["param_groups"]
    if len(pgs) != 1:
        return None
    ids = pgs[0]["params"]
    keys = [k for k, t in tensors.items() if t.is_floating_point() or t.is_complex()]
    want: list[tuple[int, ...] | None] = []
    for pid in ids:
        st = osd["state"].get(pid)
        shapes = {tuple(v.shape) for v in (st or {}).values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if len(shapes) > 1:
            return None
        want.append(next(iter(shapes)) if shapes else None)
    n, k = len(want), len(keys)
    if n > k or n * k > 20_000_000:
        return None
    key_shapes = [tuple(tensors[key].shape) for key in keys]

    def fits(i: int, j: int) -> bool:
        return want[i] is None or want[i] == key_shapes[j]

    # ways[i][j]: number of ways (capped at 2) to place parameters i.. on keys j.., in order
    ways = [[0] * (k + 1) for _ in range(n + 1)]
    ways[n] = [1] * (k + 1)
    for i in range(n - 1, -1, -1):
        row, nxt = ways[i], ways[i + 1]
        for j in range(k - 1, -1, -1):
            row[j] = min(2, row[j + 1] + (nxt[j + 1] if fits(i, j) else 0))
    if ways[0][0] != 1:
        return None
    chosen, j = [], 0
    for i in range(n):
        while not (fits(i, j) and ways[i + 1][j + 1] == 1 and ways[i][j + 1] == 0):
            j += 1
        chosen.append(keys[j])
        j += 1
    return [chosen]


def name_optimizer(
    imp: ImportRecord,
    cname: str,
    osd: dict[str, Any],
    where: str,
    model: torch.nn.Module | None,
    tensors: Mapping[str, torch.Tensor],
    *,
    positional: bool = True,
    order_is_parameter_order: bool = True,
) -> Captured:
    """Optimizer state keyed by name: by the given model (checked), else by order (unique fit; only when the order of
    ``tensors`` is the model's parameter order, ``order_is_parameter_order``), else (with ``positional``) by
    position.

    Raises:
        OptimizerMappingError: ``model`` is given and no way of grouping its parameters, or several, fit the state;
            or, without ``positional``, no model is given and the order does not name them with certainty.
    """
    if model is not None:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        groups, how = match_grouping(osd, _model_groupings(model, osd), shapes, where)
        imp.notes.append(f"{cname}: parameters named by the given model ({how}), checked against the saved state")
        return optimizer_component(cname, osd, groups)
    inferred = _infer_by_order(osd, tensors) if order_is_parameter_order else None
    if inferred is not None:
        imp.notes.append(
            f"{cname}: parameters named by order: the optimizer has one group, and exactly one ordered choice of the "
            "state dict's floating-point tensors fits every saved state shape (assumes it was built from "
            "model.parameters(); pass model= to check against the model itself)"
        )
        return optimizer_component(cname, osd, inferred)
    if not positional:
        raise OptimizerMappingError(
            f"cannot name the parameters of the optimizer state in {where}: the file keys them by number, and "
            "without a model only a single parameter group whose state shapes fit the weights' tensors in exactly "
            "one order can be named; pass model= (an instance of the architecture: its parameter names are checked "
            "against the saved state), or import the weights without the optimizer file"
        )
    imp.notes.append(
        f"{cname}: parameters keyed by position (param_groups[g][i]): the file does not name them and no model was "
        "given to name them; a restore into a live optimizer needs the parameter names, so re-import with model= (an "
        "instance of the architecture) to restore the optimizer; the model restores as is"
    )
    return optimizer_component(cname, osd, _positional(osd))


# HF Trainer's parameter groups: weight decay for every parameter except biases and norm layers.
# transformers 5.x (Trainer.get_decay_parameter_names): not inside an nn.LayerNorm, and the lower-cased name matches
# none of these regular expressions.
_HF_NO_DECAY_V5 = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
# transformers 4.4x: not inside an nn.LayerNorm, and the lower-cased name contains none of these.
_HF_NO_DECAY_V4 = ("bias", "layernorm", "rmsnorm")


def _hf_parameter_names(model: torch.nn.Module, match: Callable[[str], bool]) -> list[str]:
    """transformers' ``get_parameter_names``: parameters not inside an ``nn.LayerNorm`` and not matched by name."""
    out: list[str] = []
    for name, child in model.named_children():
        out += [f"{name}.{n}" for n in _hf_parameter_names(child, match)
                if not isinstance(child, torch.nn.LayerNorm) and not match(f"{name}.{n}".lower())]  # fmt: skip
    out += [k for k in model._parameters if not match(k.lower())]
    return out


def hf_groupings(model: torch.nn.Module) -> list[tuple[str, Grouping]]:
    """HF Trainer's decay / no-decay parameter groups (transformers 5 and 4 rules), to check against a file."""
    rules: list[tuple[str, Callable[[str], bool]]] = [
        ("transformers 5 Trainer decay / no-decay groups",
         lambda n: any(re.search(p, n) for p in _HF_NO_DECAY_V5)),
        ("transformers 4 Trainer decay / no-decay groups", lambda n: any(s in n for s in _HF_NO_DECAY_V4)),
    ]  # fmt: skip
    out = []
    for label, match in rules:
        decay = set(_hf_parameter_names(model, match))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        out.append((label, [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]))
    return out


def timm_groupings(model: torch.nn.Module) -> list[tuple[str, Grouping]]:
    """timm's optimizer factory groups (its own functions): weight decay except 1-D / bias / no_weight_decay()."""
    try:
        timm_optim = importlib.import_module("timm.optim")
    except ImportError:
        return []
    param_groups_weight_decay = timm_optim.param_groups_weight_decay
    by_id = param_names({"model": model})  # the names a save of the model records
    nwd_fn = getattr(model, "no_weight_decay", None)
    nwd = set(nwd_fn()) if callable(nwd_fn) else set()
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=nwd)
    out = [("timm weight-decay groups", [[by_id[id(p)] for p in g["params"]] for g in groups])]
    try:
        quiet = logging.getLogger(timm_optim.param_groups_layer_decay.__module__)
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "has no effect" on a model without layers: this grouping just won't fit
        try:
            layered = timm_optim.param_groups_layer_decay(model, 1.0, no_weight_decay_list=nwd, layer_decay=0.5)
        finally:
            quiet.setLevel(level)
        out.append(("timm layer-decay groups", [[by_id[id(p)] for p in g["params"]] for g in layered]))
    except Exception:  # models without a group_matcher: this grouping does not apply
        pass
    return out
