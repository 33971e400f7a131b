"""The manager layer: :class:`CheckpointManager` (policy) and :class:`Retention`."""

from ckptkit.manager.manager import CheckpointManager
from ckptkit.manager.retention import Retention

__all__ = ["CheckpointManager", "Retention"]
