"""Storage layer: a repository of content-addressed objects and manifests on any fsspec URL. Imports no torch.

:mod:`~ckptkit.storage.repository` holds the repository semantics (content addressing, commit, pending
records, gc) on top of the :class:`~ckptkit.storage.backend.Backend` protocol; :mod:`~ckptkit.storage.local`,
:mod:`~ckptkit.storage.s3` and :mod:`~ckptkit.storage.fsspec_backend` implement it for local disk, S3 and any
other fsspec filesystem.
"""

from ckptkit.storage.backend import DEFAULT_MAX_CONCURRENCY, DEFAULT_PART_SIZE
from ckptkit.storage.repository import LOCK_STALE_AFTER, STALE_AFTER, GcReport, Repository

__all__ = ["DEFAULT_MAX_CONCURRENCY", "DEFAULT_PART_SIZE", "LOCK_STALE_AFTER", "STALE_AFTER", "GcReport", "Repository"]
