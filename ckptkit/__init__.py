"""ckptkit: resumable, continuable, transferable and auditable PyTorch training checkpoints on any storage."""

__version__ = "0.1.0"

from ckptkit.api import RestoreResult, inspect, restore, save, verify
from ckptkit.export import export
from ckptkit.manager import CheckpointManager, Retention
from ckptkit.transfer import TransferPlan, transfer

__all__ = [
    "CheckpointManager",
    "RestoreResult",
    "Retention",
    "TransferPlan",
    "__version__",
    "export",
    "inspect",
    "restore",
    "save",
    "transfer",
    "verify",
]
