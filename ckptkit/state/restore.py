"""Restore of training state into the user's live objects: models (through their adapter), optimizers by
parameter name, Stateful objects and process RNG. Nothing here knows about storage.

Every restore has two steps. *Prepare* (``prepare_*``) decodes a component's saved state and checks it against
the live object (keys, shapes, types, what the object's ``load_state_dict`` will accept) without changing
anything; it raises :class:`~ckptkit.errors.ManifestError` naming the component and the field for saved state that
is malformed, and :class:`~ckptkit.errors.StateMismatchError` for state that does not fit. *Apply* (the returned
callable) then loads. A restore prepares every component before it applies the first, so a checkpoint that fails
leaves the live objects as they were.
"""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from ckptkit.errors import ManifestError, StateMismatchError
from ckptkit.format import decode
from ckptkit.schema import ComponentKind, resolve_aliases
from ckptkit.state.adapter import ModelAdapter, find_adapter, get_adapter
from ckptkit.state.capture import RNG, Stateful, group_names
from ckptkit.state.foreign import live_state
from ckptkit.state.schedulers import HELD_LR_KEY, hold_lr

__all__ = [
    "LoadReport",
    "Saved",
    "prepare_model",
    "prepare_optimizer",
    "prepare_rng",
    "prepare_stateful",
    "restore_model",
    "restore_optimizer",
    "restore_rng",
    "restore_stateful",
]

log = logging.getLogger("ckptkit")


@dataclass
class LoadReport:
    """How a component's saved tensors matched the live object (what a non-strict restore returns)."""

    component: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"{self.loaded} loaded"]
        if self.missing:
            parts.append(f"missing in checkpoint: {_few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (not in the model): {_few(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} saved {s} vs model {m}" for k, (s, m) in list(self.mismatched.items())[:5]]
            parts.append(f"shape mismatch: {', '.join(shown)}" + (" ..." if len(self.mismatched) > 5 else ""))
        return "; ".join(parts)


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


@dataclass
class Saved:
    """A component as read back from a checkpoint: its kind, JSON, tensors and metadata."""

    kind: ComponentKind
    json: Any
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    adapter: str | None
    meta: dict[str, Any]


def _where(name: str) -> str:
    return f"component {name!r}"


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --- models --------------------------------------------------------------------------------------------------


def prepare_model(
    name: str, model: torch.nn.Module, saved: Saved, strict: bool
) -> tuple[LoadReport, Callable[[], None]]:
    """Match saved tensors (aliases resolved) against ``model``'s; return the report and the load to apply.

    Raises:
        ManifestError: an alias loops or names no stored tensor.
        StateMismatchError: ``strict`` and keys or shapes differ.
    """
    adapter = _adapter(saved, model)
    live, _ = adapter.capture(model)
    tensors = dict(saved.tensors)
    for alias, target in resolve_aliases(saved.tensors, saved.aliases, _where(name)).items():
        tensors[alias] = saved.tensors[target]
    report = LoadReport(name)
    report.missing = [k for k in live if k not in tensors]
    report.unexpected = [k for k in tensors if k not in live]
    fits: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if k not in live:
            continue
        if tuple(t.shape) != tuple(live[k].shape):
            report.mismatched[k] = (list(t.shape), list(live[k].shape))
        elif t.is_complex() and not live[k].is_complex():
            raise ManifestError(_where(name), f"tensors.{k}: complex {t.dtype} for a real {live[k].dtype} tensor")
        else:
            fits[k] = t
    if strict and not report.ok:
        raise StateMismatchError(name, report)
    report.loaded = len(fits)
    return report, lambda: adapter.restore(model, fits)


def _adapter(saved: Saved, model: torch.nn.Module) -> ModelAdapter:
    if saved.adapter:
        adapter = get_adapter(saved.adapter)
        if adapter.can_handle(model):
            return adapter
        log.debug("restore: adapter %r recorded in the checkpoint does not handle %s; finding one that does",
                  saved.adapter, type(model).__qualname__)  # fmt: skip
    return find_adapter(model)


def restore_model(name: str, model: torch.nn.Module, saved: Saved, strict: bool) -> LoadReport:
    """Load saved tensors into ``model``; on mismatch raise (strict) or load what fits and report."""
    report, apply = prepare_model(name, model, saved, strict)
    apply()
    return report


# --- optimizers ----------------------------------------------------------------------------------------------

# State that torch.optim's own optimizers keep in the shape of the parameter (Adam's moments, SGD's momentum, ...).
_PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg",
                           "acc_delta", "sum", "exp_inf", "ax", "prev", "step_size"})  # fmt: skip


def prepare_optimizer(
    name: str, opt: torch.optim.Optimizer, saved: Saved, names: dict[int, str], strict: bool
) -> tuple[LoadReport, Callable[[], None]]:
    """Decode optimizer state keyed by parameter name and check it against ``opt``: the parameters it names, the
    structure ``load_state_dict`` needs, tensor shapes against the parameters (and against state ``opt`` already
    holds), hyperparameter types against ``opt``'s. Returns the report and the load to apply.

    Raises:
        ManifestError: the saved state is malformed (the field is named).
        StateMismatchError: ``strict`` and the parameters differ from the saved ones.
    """
    where = _where(name)
    data = decode(saved.json, saved.tensors, where)
    if not isinstance(data, dict) or not isinstance(data.get("state"), dict) or not isinstance(
            data.get("param_groups"), list):  # fmt: skip
        raise ManifestError(where, "state: expected {'state': {...}, 'param_groups': [...]}, found "
                                   f"{_short(data)}")  # fmt: skip
    saved_groups: list[dict[str, Any]] = []
    stored: list[str] = []
    for g, group in enumerate(data["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise ManifestError(where, f"param_groups[{g}]: expected a dict with a 'params' list")
        for i, p in enumerate(group["params"]):
            if not isinstance(p, str):
                raise ManifestError(where, f"param_groups[{g}].params[{i}]: a parameter name must be a string, found "
                                           f"{_short(p)}")  # fmt: skip
        saved_groups.append(group)
        stored.extend(group["params"])
    if len(set(stored)) != len(stored):
        dup = sorted(n for n, c in Counter(stored).items() if c > 1)
        raise ManifestError(where, f"param_groups: parameters listed more than once: {_few(dup)}")
    groups = _align(group_names(opt, names), stored)
    report = LoadReport(name)
    live = {n for g in groups for n in g}
    report.missing = sorted(live - set(stored))
    report.unexpected = sorted(set(stored) - live)
    if len(saved_groups) != len(groups):
        report.mismatched["param_groups"] = ([len(saved_groups)], [len(groups)])
    if strict and not report.ok:
        raise StateMismatchError(
            name, report, "build the optimizer over the same parameters as the saved run, or pass strict=False"
        )
    params = {n: p for g, group in zip(groups, opt.param_groups, strict=True)
              for n, p in zip(g, group["params"], strict=True)}  # fmt: skip
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    new_groups = []
    for g, live_names in enumerate(groups):
        current = {k: v for k, v in opt.param_groups[g].items() if k != "params"}
        hparams = {k: v for k, v in saved_groups[g].items() if k != "params"} if g < len(saved_groups) else {}
        for k, v in hparams.items():
            problem = _unlike(v, current[k], exact_len=True, path=f"param_groups[{g}].{k}") if k in current else None
            if problem:
                raise ManifestError(where, problem)
        new_groups.append({**current, **hparams, "params": [index[n] for n in live_names]})
    new_state: dict[int, dict[str, Any]] = {}
    for pname, st in data["state"].items():
        if pname not in index:
            continue  # state of a parameter the live optimizer does not have (reported as unexpected)
        if not isinstance(st, dict) or not all(isinstance(k, str) for k in st):
            raise ManifestError(where, f"state.{pname}: expected a dict of named values, found {_short(st)}")
        p = params[pname]
        held = opt.state.get(p, {})
        for k, v in st.items():
            problem = _optimizer_value(v, k, p)
            if problem:
                raise ManifestError(where, f"state.{pname}.{k}: {problem}")
        shapes = {k: list(v.shape) for k, v in st.items() if isinstance(v, torch.Tensor) and _misshapen(
            k, v, p, held.get(k), type(opt).__module__.startswith("torch.optim"))}  # fmt: skip
        if shapes:  # state of a parameter whose shape changed (or was edited): loading it would break the next step
            report.mismatched[pname] = (next(iter(shapes.values())), list(p.shape))
            continue
        new_state[index[pname]] = st
    if strict and report.mismatched:
        raise StateMismatchError(name, report, "the optimizer state was saved for parameters of other shapes: build "
                                               "the model as in the saved run, or pass strict=False")  # fmt: skip
    report.loaded = len(new_state)
    return report, lambda: opt.load_state_dict({"state": new_state, "param_groups": new_groups})


def _align(groups: list[list[str]], stored: list[str]) -> list[list[str]]:
    """The live parameter names, matched to the saved ones across a change in how many models the state holds.

    Parameter names are prefixed by the model's component name only when the state holds several models. So an
    optimizer saved with one model (``fc.weight``) and restored beside an EMA copy (``model.fc.weight``), or the
    other way round, names the same parameters differently: when dropping (or adding) one common ``<component>.``
    prefix makes the two sets of names equal, those names are used; otherwise the names are left as they are.
    """
    live = [n for g in groups for n in g]
    want = set(stored)
    if not live or not want or set(live) == want:
        return groups
    heads = {n.split(".", 1)[0] for n in live}
    if len(heads) == 1 and all("." in n for n in live):
        cut = len(next(iter(heads))) + 1
        stripped = [[n[cut:] for n in g] for g in groups]
        if {n for g in stripped for n in g} == want:
            return stripped
    heads = {n.split(".", 1)[0] for n in stored}
    if len(heads) == 1 and all("." in n for n in stored):
        head = next(iter(heads)) + "."
        prefixed = [[head + n for n in g] for g in groups]
        if {n for g in prefixed for n in g} == want:
            return prefixed
    return groups


def _misshapen(key: str, v: torch.Tensor, p: torch.Tensor, held: Any, torch_optim: bool) -> bool:
    """Whether state tensor ``key`` has another shape than the optimizer would keep for parameter ``p``: than the
    state the optimizer already holds, or (torch.optim's own optimizers) than ``p`` itself for per-element state."""
    if isinstance(held, torch.Tensor) and tuple(held.shape) != tuple(v.shape):
        return True
    return torch_optim and key in _PARAM_SHAPED and tuple(v.shape) != tuple(p.shape)


def _optimizer_value(v: Any, key: str, p: torch.Tensor) -> str | None:
    """Why the saved per-parameter value ``v`` cannot be state ``key`` of parameter ``p``, or None."""
    problem = _plain_state(v, 0)
    if problem:
        return problem
    if isinstance(v, torch.Tensor) and v.is_complex() and not p.is_complex():
        return f"a complex {v.dtype} tensor for a real {p.dtype} parameter"
    if key == "step" and not (
        (isinstance(v, torch.Tensor) and v.numel() == 1)
        or (isinstance(v, (int, float)) and not isinstance(v, bool))
    ):
        return f"a step count must be a number or a one-element tensor, found {_describe(v)}"
    return None


def _plain_state(v: Any, depth: int) -> str | None:
    """Optimizer state torch's ``load_state_dict`` copies as it is: tensors, numbers, None and containers of them."""
    if v is None or isinstance(v, (bool, int, float, torch.Tensor)):
        return None
    if isinstance(v, (list, tuple)):
        return next((p for x in v if (p := _plain_state(x, depth + 1))), None)
    if isinstance(v, dict):
        return next((p for x in v.values() if (p := _plain_state(x, depth + 1))), None)
    return f"{_describe(v)}, which optimizer state cannot hold (tensors, numbers and lists or dicts of them)"


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {list(v.shape)}"
    return f"a {type(v).__name__} {_short(v)}"


def restore_optimizer(
    name: str, opt: torch.optim.Optimizer, saved: Saved, names: dict[int, str], strict: bool
) -> LoadReport:
    """Load optimizer state by parameter name into ``opt``, whatever the order of its parameters."""
    report, apply = prepare_optimizer(name, opt, saved, names, strict)
    apply()
    return report


# --- schedulers, grad scalers, other Stateful objects ----------------------------------------------------------

# Strings torch's schedulers act on when their state is loaded (or at the next step): only these values work.
_CHOICES: dict[str, frozenset[str]] = {
    "mode": frozenset({"min", "max", "triangular", "triangular2", "exp_range"}),
    "threshold_mode": frozenset({"rel", "abs"}),
    "scale_mode": frozenset({"cycle", "iterations"}),
    "_anneal_func_type": frozenset({"cos", "linear"}),
}
# Keys whose absence makes a torch scheduler's load_state_dict fail (LambdaLR, SequentialLR, CyclicLR ...).
_REQUIRED = frozenset({"lr_lambdas", "_schedulers", "_scale_fn_custom"})


def prepare_stateful(name: str, obj: Stateful, saved: Saved) -> Callable[[], None]:
    """Decode the saved state of a Stateful object; return the ``obj.load_state_dict`` to apply.

    For LR schedulers and grad scalers (whose ``load_state_dict`` trusts its input) the decoded state is checked
    against the live object's own ``state_dict()``: the same keys where loading needs them, values of the same
    types, and (for torch's own classes) lists of the same lengths. Any other Stateful object gets the decoded
    state as it is.

    A scheduler saved held at a constant LR (:func:`ckptkit.state.schedulers.hold_lr`, whose state carries
    ``"ckptkit_held_lr": true``) is loaded without that marker and then held: a freshly built scheduler of the
    original class comes back held.

    Raises:
        ManifestError: the saved state does not decode, or does not fit a scheduler's or scaler's state.
    """
    data = decode(saved.json, saved.tensors, _where(name))
    held = False
    if saved.kind == "scheduler" and isinstance(data, dict) and HELD_LR_KEY in data:
        data = dict(data)
        held = data.pop(HELD_LR_KEY)
        if not isinstance(held, bool):
            raise ManifestError(_where(name), f"state.{HELD_LR_KEY}: expected true or false, found {_describe(held)}")
        if held and not isinstance(obj, (torch.optim.lr_scheduler.LRScheduler,
                                         torch.optim.lr_scheduler.ReduceLROnPlateau)):  # fmt: skip
            raise ManifestError(_where(name), f"state.{HELD_LR_KEY}: the scheduler was saved held at a constant LR, "
                                              f"which only a torch LR scheduler can be, not a {type(obj).__name__}: "
                                              "restore it into a torch.optim.lr_scheduler scheduler")  # fmt: skip
    if saved.kind in ("scheduler", "grad_scaler"):
        live = obj.state_dict()
        if isinstance(live, dict) and (live or saved.kind == "scheduler"):  # a disabled GradScaler loads nothing
            # torch's own schedulers and scalers keep lists of one entry per param group; a subclass (ckptkit's
            # PlannedLR, a user's scheduler) may keep lists that grow (PlannedLR's segments after a re-plan).
            own = type(obj).__module__.startswith("torch.")
            problem = _unlike(data, live, exact_len=own, require=set(live) if saved.kind == "grad_scaler" else None,
                              path="state")  # fmt: skip
            if problem:
                raise ManifestError(_where(name), problem)

    data = live_state(obj, data, _where(name))

    def apply() -> None:
        obj.load_state_dict(data)
        if held:
            hold_lr(cast("torch.optim.lr_scheduler.LRScheduler", obj))

    return apply


def restore_stateful(name: str, obj: Stateful, saved: Saved) -> None:
    """Hand the decoded state to ``obj.load_state_dict``."""
    prepare_stateful(name, obj, saved)()


def _unlike(saved: Any, live: Any, *, exact_len: bool, path: str, require: set[str] | None = None,
            depth: int = 0) -> str | None:  # fmt: skip
    """Why ``saved`` cannot replace the live value ``live`` (``"path.to.field: problem"``), or None."""
    at = f"{path}: "
    if depth > 100:
        return None  # decode bounds the depth of saved state; a live state this deep is compared no further
    if path.endswith("._scale_fn_custom"):  # CyclicLR updates its custom scale function's __dict__ with it
        if saved is None if live is None else saved is None or isinstance(saved, dict):
            return None
        return f"{at}expected {'None' if live is None else 'None or a dict'}, found {_describe(saved)}"
    if live is None:
        return None
    if isinstance(live, bool):
        return None if isinstance(saved, bool) else f"{at}expected true or false, found {_describe(saved)}"
    if isinstance(live, (int, float)) or (isinstance(live, torch.Tensor) and live.numel() == 1 and live.ndim == 0):
        if isinstance(saved, bool) or not (
            isinstance(saved, (int, float)) or (isinstance(saved, torch.Tensor) and saved.numel() == 1)
        ):
            return f"{at}expected a number, found {_describe(saved)}"
        if isinstance(saved, torch.Tensor) and saved.is_complex():
            return f"{at}expected a real number, found {_describe(saved)}"
        return None
    if isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(live.shape):
            return f"{at}expected a tensor of shape {list(live.shape)}, found {_describe(saved)}"
        return None
    if isinstance(live, str):
        if not isinstance(saved, str):
            return f"{at}expected a string, found {_describe(saved)}"
        key = path.rsplit(".", 1)[-1]
        if key in _CHOICES and saved not in _CHOICES[key]:
            return f"{at}{saved!r} is not one of {sorted(_CHOICES[key])}"
        return None
    if isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            return f"{at}expected a list, found {_describe(saved)}"
        if exact_len and len(saved) != len(live):
            return f"{at}expected {len(live)} entries (as the live object has), found {len(saved)}"
        for i, (s, v) in enumerate(zip(saved, live, strict=False)):
            if path.endswith("lr_lambdas") and s is not None and not (isinstance(s, dict) and
                                                                      all(isinstance(k, str) for k in s)):  # fmt: skip
                return f"{path}[{i}]: expected None or a dict of attributes, found {_describe(s)}"
            problem = _unlike(s, v, exact_len=exact_len, path=f"{path}[{i}]", depth=depth + 1)
            if problem:
                return problem
        return None
    if isinstance(live, Mapping):
        if not isinstance(saved, dict):
            return f"{at}expected a dict, found {_describe(saved)}"
        needed = (require or set()) | (set(_REQUIRED & set(live)) if depth == 0 or path.endswith("]") else set())
        absent = sorted(str(k) for k in needed if k not in saved)
        if absent:
            return f"{at}missing {_few(absent)}"
        for k, s in saved.items():
            if k in live:
                problem = _unlike(s, live[k], exact_len=exact_len, path=f"{path}.{k}", depth=depth + 1)
                if problem:
                    return problem
        return None
    return None  # an object the live state holds as itself (a function, a class): nothing to compare


# --- process RNG ---------------------------------------------------------------------------------------------


def prepare_rng(saved: Saved) -> Callable[[], list[str]]:
    """Decode saved process RNG state and check that python's ``random``, numpy and torch accept it (on scratch
    generators, so the process streams stay as they are). Returns the restore to apply, which returns what could
    not be restored (e.g. a CUDA device count that differs).

    Raises:
        ManifestError: the state is malformed or a generator refuses it (the field is named).
    """
    where = _where(RNG)
    data = decode(saved.json, saved.tensors, where)
    if not isinstance(data, dict) or not {"python", "numpy", "torch"} <= set(data):
        raise ManifestError(where, f"state: expected the python, numpy and torch RNG states, found {_short(data)}")
    cuda = data.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(s, torch.Tensor) for s in cuda):
        raise ManifestError(where, f"state.cuda: expected a list of CUDA generator states, found {_short(cuda)}")
    _accepts(where, "python", lambda: random.Random().setstate(data["python"]))
    _accepts(where, "numpy", lambda: np.random.RandomState().set_state(data["numpy"]))
    states = [("torch", data["torch"], "cpu")] + [(f"cuda[{i}]", s, "cuda") for i, s in enumerate(cuda)]
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, (fname, s, device) in enumerate(states):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.uint8 or s.ndim != 1:
            raise ManifestError(where, f"state.{fname}: a generator state is a 1-D uint8 tensor, found {_describe(s)}")
        if device == "cpu" or i - 1 < have:  # states[0] is the CPU generator's, states[1 + d] CUDA device d's
            generator = torch.Generator(device if device == "cpu" else f"cuda:{i - 1}")
            _accepts(where, fname, functools.partial(generator.set_state, s))

    def apply() -> list[str]:
        random.setstate(data["python"])
        np.random.set_state(data["numpy"])
        torch.set_rng_state(data["torch"])
        problems: list[str] = []
        for i, s in enumerate(cuda[:have]):
            torch.cuda.set_rng_state(s, i)
        if cuda and len(cuda) != have:
            problems.append(f"checkpoint has RNG state of {len(cuda)} CUDA device(s), this process sees {have}")
        elif not cuda and have and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            problems.append("checkpoint holds no CUDA RNG state (saved before CUDA was used); CUDA streams not "
                            "resumed")  # fmt: skip
        return problems

    return apply


def _accepts(where: str, fname: str, trial: Callable[[], object]) -> None:
    try:
        trial()
    except Exception as err:  # each generator refuses bad state in its own way (TypeError, ValueError, RuntimeError)
        raise ManifestError(where, f"state.{fname}: not a state this generator accepts "
                                   f"({type(err).__name__}: {str(err)[:200]})") from err  # fmt: skip


def restore_rng(saved: Saved) -> list[str]:
    """Restore process RNG; return what could not be restored (e.g. a CUDA device count that differs)."""
    return prepare_rng(saved)()

