"""ckptkit inside other tools' trainers: an HF ``TrainerCallback``, a Lightning ``CheckpointIO`` / ``Callback`` and an
Accelerate hook, each saving and resuming through a :class:`~ckptkit.CheckpointManager` (hashes, dedup, any fsspec
URL, lineage, retention). Each module imports its framework only when used."""

__all__: list[str] = []
