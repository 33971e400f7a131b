"""ckptkit: resumable, continuable, transferable and auditable PyTorch training checkpoints on any storage.

The surface is two levels: a few functions (``save``, ``restore``, ``checkpoints``, ``inspect``, ``verify``,
``transfer``, ``export``, ``import_from``, ``import_files``) and one :class:`CheckpointManager`. Every function
takes a repository as a URL, a local path or an open :class:`~ckptkit.storage.Repository`; the types they
return (``RestoreResult``, ``TransferPlan``, ...) live in their modules and are reachable here too. Names are
imported on first use, so that ``import ckptkit.storage`` (or the CLI's listing verbs) does not pay for importing
torch.

Example:
    >>> import torch, ckptkit
    >>> m = ckptkit.save("memory://doc-init", {"model": torch.nn.Linear(2, 2)}, "first")
    >>> ckptkit.inspect("memory://doc-init").name
    'first'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptkit.version import __version__

if TYPE_CHECKING:
    from ckptkit.api import RestoreResult as RestoreResult
    from ckptkit.api import checkpoints, inspect, restore, save, verify
    from ckptkit.interop.export import export
    from ckptkit.interop.importers import import_files, import_from
    from ckptkit.interop.transfer import TransferPlan as TransferPlan
    from ckptkit.interop.transfer import transfer
    from ckptkit.manager import CheckpointManager, Retention

__all__ = [
    "CheckpointManager",
    "Retention",
    "__version__",
    "checkpoints",
    "export",
    "import_files",
    "import_from",
    "inspect",
    "restore",
    "save",
    "transfer",
    "verify",
]

_WHERE = {
    "CheckpointManager": "ckptkit.manager",
    "Retention": "ckptkit.manager",
    "RestoreResult": "ckptkit.api",
    "checkpoints": "ckptkit.api",
    "inspect": "ckptkit.api",
    "restore": "ckptkit.api",
    "save": "ckptkit.api",
    "verify": "ckptkit.api",
    "export": "ckptkit.interop.export",
    "import_from": "ckptkit.interop.importers",
    "import_files": "ckptkit.interop.importers",
    "TransferPlan": "ckptkit.interop.transfer",
    "transfer": "ckptkit.interop.transfer",
}


_SUBPACKAGES = {"api", "engine", "errors", "format", "hashing", "history", "interop", "manager", "schema", "state",
                "storage", "training", "adapters", "cli"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"ckptkit.{name}")
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'ckptkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
