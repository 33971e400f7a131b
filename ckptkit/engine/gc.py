"""Garbage collection: delete objects that no committed checkpoint references. Torch-free. Internal engine."""

from __future__ import annotations

from ckptkit.engine.manifests import read_manifest
from ckptkit.errors import CheckpointNotFoundError, ManifestError
from ckptkit.storage import GcReport, Repository

__all__ = ["collect_garbage"]


def collect_garbage(r: Repository, dry_run: bool = False) -> GcReport:
    """Delete objects no committed checkpoint references (never those of a save in progress).

    The order is what makes it safe next to concurrent saves (docs/format.md, "Concurrency contract"): take the
    lock, which reads the pending records of the saves in flight (:meth:`Repository.gc_lock`); only then list and
    read the manifests; then list the objects and delete the unreferenced ones (:meth:`Repository.sweep`, which
    keeps what the pending records named). A save that commits while this runs is in one of the two reads.

    Refuses to run while a manifest in the repository cannot be parsed, since its objects would look
    unreferenced. On a full local disk it still runs (the lock is then an empty file), so that it can free space.
    """
    with r.gc_lock():  # reads the pending records first
        referenced: set[str] = set()
        for n in r.list():
            try:
                m = read_manifest(r, n)
            except CheckpointNotFoundError:
                continue  # deleted while we listed
            except ManifestError as err:
                raise ManifestError(
                    f"{r.url}/checkpoints/{n}.json",
                    f"{err.problem}; gc refuses to run while a manifest is unreadable, because the objects it "
                    "references would look unreferenced: repair or delete it first",
                ) from err
            referenced.update(m.objects)
        return r.sweep(referenced, dry_run=dry_run)
