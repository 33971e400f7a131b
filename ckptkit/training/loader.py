"""Data position: where a run stands in its data, so a resume reads exactly the batches it would have read.

Three ways, from most to least exact-and-cheap:

- :class:`ResumableLoader` — ckptkit builds the ``DataLoader``. Order is a function of (seed, epoch); a resume
  skips consumed samples in the sampler, so skipped samples are never read or augmented; per-sample randomness
  (augmentation) is seeded from (seed, epoch, index), so it is the same whatever worker runs it and however
  often the run was interrupted. Changing the batch size on continue keeps the position (counted in samples).
- :class:`LoaderPosition` — wraps a ``DataLoader`` you built (it needs its own ``generator``). A resume
  replays the epoch from its start and discards the consumed batches: exact, but it reads them again.
- torchdata's ``StatefulDataLoader``: pass it as a component as it is (it is Stateful); wrap its dataset in
  :class:`WorkerRNG` so each worker's RNG state travels with the loader state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ckptkit.errors import ArgumentTypeError, InvalidArgumentError, StateMismatchError

__all__ = ["EpochSampler", "LoaderPosition", "ResumableLoader", "SeededDataset", "WorkerRNG", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that depends only on (seed, epoch, index): the same in every worker, process and resume."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & _MASK)
    base = int(torch.randint(0, 2**62, (1,), generator=g).item())
    return (base ^ (index * 0x9E3779B97F4A7C15)) & _MASK


class SeededDataset(Dataset[Any]):
    """Runs ``dataset[index]`` with python, numpy and torch RNG seeded from (seed, epoch, index).

    Indices arrive as ``(epoch, index)`` pairs (from :class:`EpochSampler`). The caller's RNG streams are saved
    and put back around each sample, so loading data in the main process (``num_workers=0``) does not disturb
    the training loop's randomness (dropout).
    """

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


class EpochSampler(Sampler[Any]):
    """Indices of one epoch, shuffled by (seed, epoch), starting after ``start`` samples of the whole epoch
    (never read); of what remains, rank ``rank`` of ``world_size`` takes every ``world_size``-th index."""

    def __init__(self, size: int, epoch: int, seed: int, shuffle: bool, start: int, keys: bool, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        self.size, self.epoch, self.seed, self.shuffle, self.start, self.keys = size, epoch, seed, shuffle, start, keys
        self.rank, self.world_size = rank, world_size

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed((self.seed * 7919 + self.epoch) & _MASK)
        return [int(i) for i in torch.randperm(self.size, generator=g)]

    def __iter__(self) -> Iterator[Any]:
        for i in self.order()[self.start :][self.rank :: self.world_size]:
            yield (self.epoch, i) if self.keys else i

    def __len__(self) -> int:
        return len(range(self.size)[self.start :][self.rank :: self.world_size])


class ResumableLoader:
    """A ``DataLoader`` whose position is saved with the checkpoint; resumes mid-epoch exactly.

    Iterate it once per epoch; it advances its epoch when an epoch is exhausted. Save it as a component.

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``).
        batch_size: samples per batch; may change when a run is continued.
        shuffle: shuffle each epoch, by (seed, epoch).
        seed: the run's data seed.
        seeded_samples: seed per-sample randomness (augmentation) from (seed, epoch, index). Keep it on for an
            exact resume with random augmentation.
        rank, world_size: data-parallel training: this process is rank ``rank`` of ``world_size`` (e.g.
            ``torch.distributed.get_rank()``, ``get_world_size()``). Every rank draws the same epoch order and takes
            every ``world_size``-th sample of it; the position saved is the whole epoch's (samples consumed by all
            ranks together, the ranks stepping in lockstep), so a run resumed on another number of ranks re-splits
            the rest of the epoch: no sample is repeated or skipped within it. At an epoch's tail a rank may get
            one sample fewer than the others (nothing is padded or dropped).
        **loader_options: passed to ``DataLoader`` (num_workers, collate_fn, pin_memory, drop_last, ...).

    Example:
        >>> import torch
        >>> loader = ResumableLoader(torch.utils.data.TensorDataset(torch.arange(10.)), batch_size=4, seed=0)
        >>> [len(b[0]) for b in loader], loader.epoch
        ([4, 4, 2], 1)
    """

    data_loader = True  # marks loader state for the resume fidelity report

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        seeded_samples: bool = True,
        rank: int = 0,
        world_size: int = 1,
        **loader_options: Any,
    ) -> None:
        for banned in ("sampler", "batch_sampler", "shuffle", "generator"):
            if banned in loader_options:
                raise InvalidArgumentError(f"ResumableLoader sets {banned!r} itself (order comes from seed and epoch); "
                                           "drop it")
        if not isinstance(dataset, Sized):
            raise ArgumentTypeError("ResumableLoader needs a map-style dataset with __len__; for iterable datasets "
                                    "use torchdata's StatefulDataLoader")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and isinstance(rank, int) and world_size >= 1 and 0 <= rank < world_size):
            raise InvalidArgumentError(f"rank {rank!r} of world_size {world_size!r}: need integers with world_size "
                                       ">= 1 and 0 <= rank < world_size (torch.distributed.get_rank(), "
                                       "get_world_size())")  # fmt: skip
        self.rank, self.world_size = rank, world_size
        self.resplit: tuple[int, int] | None = None
        """(saved world size, this one) when the position was loaded from a run on another number of ranks."""
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.seeded_samples = seeded_samples
        self.loader_options = loader_options
        self.epoch = 0
        self.samples_in_epoch = 0
        self.batches_in_epoch = 0

    def __len__(self) -> int:
        """Batches in a whole epoch at the current batch size (this rank's)."""
        n = len(range(len(self.dataset))[self.rank :: self.world_size])
        if self.loader_options.get("drop_last"):
            return n // self.batch_size
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Any]:
        size = len(self.dataset)
        sampler = EpochSampler(size, self.epoch, self.seed, self.shuffle, self.samples_in_epoch, self.seeded_samples,
                               self.rank, self.world_size)  # fmt: skip
        dataset = SeededDataset(self.dataset, self.seed) if self.seeded_samples else self.dataset
        # The loader's own generator keeps iter() from drawing worker seeds from the global RNG.
        gen = torch.Generator().manual_seed((self.seed * 31 + self.epoch) & _MASK)
        loader = DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, generator=gen, **self.loader_options)
        for batch in loader:  # every rank takes a batch: the epoch advances by one batch per rank
            self.samples_in_epoch = min(size, self.samples_in_epoch + self.batch_size * self.world_size)
            self.batches_in_epoch += 1
            yield batch
        self.epoch += 1
        self.samples_in_epoch = 0
        self.batches_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "batches_in_epoch": self.batches_in_epoch, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "dataset_size": len(self.dataset), "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        size = len(self.dataset)
        if state["dataset_size"] != size:
            raise StateMismatchError(
                "ResumableLoader",
                f"its state is for a dataset of {state['dataset_size']} samples, this one has {size}",
                "to train on new data, use CheckpointManager.continue_from(..., new_data=DataSegment(...))",
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        saved_world = int(state.get("world_size", 1))  # states saved before ranks were known: one process
        self.resplit = (saved_world, self.world_size) if saved_world != self.world_size else None
        # Batches are re-counted at this loader's batch size and world size (either may have changed).
        per_round = self.batch_size * self.world_size
        self.batches_in_epoch = (self.samples_in_epoch + per_round - 1) // per_round


class LoaderPosition:
    """Tracks the position of a ``DataLoader`` you built; a resume replays the epoch and skips consumed batches.

    The loader must have its own ``generator`` (``DataLoader(..., generator=torch.Generator().manual_seed(s))``):
    without one, each ``iter()`` draws from the global RNG and shifts the training loop's random streams.
    """

    data_loader = True

    def __init__(self, loader: DataLoader[Any]) -> None:
        if loader.generator is None:
            raise InvalidArgumentError(
                "LoaderPosition needs DataLoader(..., generator=torch.Generator().manual_seed(seed)): without its "
                "own generator the loader draws its order and worker seeds from the global RNG"
            )
        self.loader = loader
        self.epoch = 0
        self.batches_in_epoch = 0
        self._epoch_start: torch.Tensor = loader.generator.get_state()

    def __iter__(self) -> Iterator[Any]:
        gen = self.loader.generator
        assert gen is not None
        if self.batches_in_epoch == 0:
            self._epoch_start = gen.get_state()
        else:
            gen.set_state(self._epoch_start)  # replay this epoch's order and worker seeds
        it = iter(self.loader)
        for _ in range(self.batches_in_epoch):
            next(it)
        for batch in it:
            self.batches_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batches_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "epoch_start_rng": self._epoch_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self._epoch_start = state["epoch_start_rng"].clone()
        assert self.loader.generator is not None
        self.loader.generator.set_state(self._epoch_start)


class WorkerRNG(Dataset[Any]):
    """For torchdata's ``StatefulDataLoader``: a dataset wrapper whose state is the worker's RNG state.

    ``StatefulDataLoader(WorkerRNG(dataset), snapshot_every_n_steps=1, ...)`` saves each worker's python, numpy
    and torch RNG state with every batch and puts it back after re-seeding on resume, so random augmentation
    continues exactly.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
