"""Training-loop helpers: a resumable data loader, planned LR schedules, and data fingerprints.

Example:
    >>> from ckptkit.training import PlannedLR, ResumableLoader, fingerprint
"""

from ckptkit.training.fingerprints import fingerprint, segment
from ckptkit.training.loader import LoaderPosition, ResumableLoader, WorkerRNG
from ckptkit.training.schedule import PlannedLR, Policy

__all__ = ["LoaderPosition", "PlannedLR", "Policy", "ResumableLoader", "WorkerRNG", "fingerprint", "segment"]
