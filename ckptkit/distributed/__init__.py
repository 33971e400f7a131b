"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): ckptkit is DCP's storage (a ``StorageWriter``
and ``StorageReader`` over the repository), so each rank's shards become content-addressed, hashed objects and one
rank commits the manifest after every rank finished. No protocol of ckptkit's own."""

__all__: list[str] = []
