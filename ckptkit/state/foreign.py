"""Other frameworks' objects whose ``state_dict()`` holds objects, not plain values: their state is stored as plain
data (tensors, numpy arrays, JSON) and rebuilt as their classes when it is loaded into a live object of the same
framework. Today that is mmengine's ``MessageHub``, whose logged scalars are ``HistoryBuffer`` objects, and
mmengine's parameter schedulers, which are LR schedulers that do not derive from torch's. The frameworks are
never imported here: objects are recognised by their class names, and a class is imported only from the module of
the live object the state goes into."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ckptkit.errors import ManifestError

__all__ = ["HISTORY_BUFFER", "MESSAGE_HUB", "TYPE_KEY", "is_foreign_scheduler", "live_state", "plain_state"]

MESSAGE_HUB = "mmengine.logging.message_hub.MessageHub"
"""The class name of mmengine's MessageHub (a Runner's logged scalars and runtime information)."""
HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
"""The class name of mmengine's HistoryBuffer (one logged scalar's history)."""
TYPE_KEY = "ckptkit_type"
"""The key that marks a dict as the plain form of an object (its value: the object's class name)."""

_SCHEDULER_BASES = frozenset({"mmengine.optim.scheduler.param_scheduler._ParamScheduler"})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_foreign_scheduler(obj: object) -> bool:
    """Whether ``obj`` is another framework's LR / parameter scheduler (mmengine's ``LinearLR``, ``MultiStepLR`` ...),
    saved and restored as a scheduler like torch's own.

    Example:
        >>> is_foreign_scheduler(object())
        False
    """
    return any(_qualname(c) in _SCHEDULER_BASES for c in type(obj).__mro__)


def _buffer_plain(value: Any, where: str) -> dict[str, Any]:
    attrs = value if isinstance(value, Mapping) else getattr(value, "__dict__", None)
    if not isinstance(attrs, Mapping) or "_log_history" not in attrs or "_count_history" not in attrs:
        raise ManifestError(where, f"expected an mmengine HistoryBuffer (its _log_history and _count_history), found "
                                   f"{type(value).__name__}")  # fmt: skip
    return {TYPE_KEY: HISTORY_BUFFER, "log_history": attrs["_log_history"], "count_history": attrs["_count_history"],
            "max_length": int(attrs.get("max_length", 1000000))}  # fmt: skip


def plain_state(type_name: str, state: Any) -> Any:
    """The plain form of the ``state_dict()`` of an object of class ``type_name``: for mmengine's MessageHub, each
    logged scalar's HistoryBuffer (a live one, or one read from a file as plain data) becomes ``{"ckptkit_type":
    HISTORY_BUFFER, "log_history": ..., "count_history": ..., "max_length": ...}``; any other state as it is.

    Raises:
        ManifestError: a MessageHub's state does not hold HistoryBuffers where mmengine puts them.

    Example:
        >>> plain_state("torch.optim.lr_scheduler.StepLR", {"last_epoch": 3})
        {'last_epoch': 3}
    """
    if type_name != MESSAGE_HUB or not isinstance(state, Mapping):
        return state
    scalars = state.get("log_scalars")
    if not isinstance(scalars, Mapping):
        return dict(state)
    return {**state, "log_scalars": {str(k): _buffer_plain(v, f"{type_name} log_scalars[{k!r}]")
                                     for k, v in scalars.items()}}  # fmt: skip


def live_state(obj: object, data: Any, where: str) -> Any:
    """``data`` (as :func:`plain_state` stored it) in the form ``obj.load_state_dict`` takes: for a live mmengine
    MessageHub, each plain HistoryBuffer rebuilt as mmengine's own class (imported from mmengine, which the live
    object comes from); any other state as it is.

    Raises:
        ManifestError: a plain HistoryBuffer is damaged (the message names it).
    """
    if _qualname(type(obj)) != MESSAGE_HUB or not isinstance(data, Mapping):
        return data
    scalars = data.get("log_scalars")
    if not isinstance(scalars, Mapping):
        return data
    buffer_cls = importlib.import_module(HISTORY_BUFFER.rpartition(".")[0]).HistoryBuffer
    rebuilt: dict[str, Any] = {}
    for key, plain in scalars.items():
        if not (isinstance(plain, Mapping) and plain.get(TYPE_KEY) == HISTORY_BUFFER):
            raise ManifestError(where, f"state.log_scalars[{key!r}]: expected a stored HistoryBuffer ({TYPE_KEY}: "
                                       f"{HISTORY_BUFFER!r}), found {type(plain).__name__}")  # fmt: skip
        log: Any = plain.get("log_history")
        count: Any = plain.get("count_history")
        length = plain.get("max_length")
        if not (hasattr(log, "__len__") and hasattr(count, "__len__") and len(log) == len(count)
                and isinstance(length, int) and length > 0):  # fmt: skip
            raise ManifestError(where, f"state.log_scalars[{key!r}]: a HistoryBuffer needs log_history and "
                                       "count_history of one length and a positive max_length")  # fmt: skip
        rebuilt[str(key)] = buffer_cls(list(log), list(count), length)
    return {**data, "log_scalars": rebuilt}
