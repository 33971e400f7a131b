"""ckptkit: resumable, continuable, transferable and auditable PyTorch training checkpoints on any storage."""

__version__ = "0.1.0"

from ckptkit.api import RestoreResult, inspect, restore, save, verify
from ckptkit.export import export
from ckptkit.importers import import_from
from ckptkit.manager import CheckpointManager, Retention
from ckptkit.transfer import TransferPlan, transfer

__all__ = [
    "CheckpointManager",
    "RestoreResult",
    "Retention",
    "TransferPlan",
    "__version__",
    "export",
    "import_from",
    "inspect",
    "restore",
    "save",
    "transfer",
    "verify",
]
