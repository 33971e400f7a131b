"""ckptkit: resumable, continuable, transferable and auditable PyTorch training checkpoints on any storage."""

__version__ = "0.1.0"

from ckptkit.api import RestoreResult, inspect, restore, save, verify
from ckptkit.manager import CheckpointManager, Retention

__all__ = ["CheckpointManager", "RestoreResult", "Retention", "__version__", "inspect", "restore", "save", "verify"]
