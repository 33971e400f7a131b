"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): ckptkit is DCP's storage (a ``StorageWriter``
and ``StorageReader`` over the repository), so each rank's shards become content-addressed, hashed objects and one
rank commits the manifest after every rank finished. No protocol of ckptkit's own.

Two functions for a training loop, called on every rank (see docs/distributed.md)::

    import ckptkit.distributed as cd
    result = cd.load(url, {"model": model, "optimizer": opt})      # reshards N -> M; RNG back when N == M
    cd.save(url, {"model": model, "optimizer": opt}, f"step-{step:08d}", retention=ckptkit.Retention(keep_last=3))
    pending = cd.async_save(url, state, name)                     # returns once the state is copied to host memory
    pending.wait()                                                # or let the next save wait for it

``cd.consolidate(url, dest)`` writes a sharded checkpoint's model as one safetensors file of full tensors.

and the DCP storage classes, for ``dcp.save(..., storage_writer=RepositoryWriter(url, name))`` and
``dcp.load(..., storage_reader=RepositoryReader(url, name))``. Importing this package imports
``torch.distributed.checkpoint``; ``import ckptkit`` does not import it.
"""

from ckptkit.distributed.checkpoint import AsyncSave, async_save, load, save, wait
from ckptkit.distributed.export import StoredTensor, consolidate, full_state_dict, stored_tensors
from ckptkit.distributed.retention import RetentionLike, prune
from ckptkit.distributed.storage import RepositoryReader, RepositoryWriter

__all__ = [
    "AsyncSave",
    "RepositoryReader",
    "RepositoryWriter",
    "RetentionLike",
    "StoredTensor",
    "async_save",
    "consolidate",
    "full_state_dict",
    "load",
    "prune",
    "save",
    "stored_tensors",
    "wait",
]
