"""Host-memory snapshots of captured state, for async save: training may change tensors in place the moment
``save`` returns, so the background writer must only ever read copies.

Buffers are kept between saves and reused when shape and dtype match, so a steady training loop allocates
once. Tensors on a GPU are copied into pinned host buffers with non-blocking copies, then synchronised once.
For a writer process (``CheckpointManager(writer="process")``) every buffer is a view of one shared-memory
arena (an anonymous ``memfd``, Linux), which the writer process maps too: it reads the tensors' bytes where they
are, nothing is pickled or copied between the processes.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, replace

import torch

from ckptkit.state import Captured

__all__ = ["Arena", "Snapshotter"]

ALIGN = 64  # every buffer of an arena starts at a multiple of this (any dtype's alignment, a cache line)


@dataclass(eq=False)
class Arena:
    """Shared memory that a snapshot's buffers live in: an anonymous file (``fd``, kept open to hand to a writer
    process), mapped here as ``base``. ``generation`` changes whenever the buffers move to a new arena."""

    fd: int
    size: int
    base: torch.Tensor
    generation: int

    def close(self) -> None:
        """Close the file descriptor (the mapping lives as long as tensors refer to it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _new_arena(size: int, generation: int) -> Arena:
    fd = os.memfd_create("ckptkit-snapshot", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(size, 1))
        mm = mmap.mmap(fd, max(size, 1))
    except BaseException:
        os.close(fd)
        raise
    return Arena(fd, size, torch.frombuffer(mm, dtype=torch.uint8), generation)


def arena_view(base: torch.Tensor, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` stored at ``offset`` of an arena mapped as ``base`` (bytes)."""
    nbytes = math.prod(shape) * dtype.itemsize
    return base[offset : offset + nbytes].view(dtype).view(shape)


class Snapshotter:
    """Copies the tensors of captured components into reusable host buffers.

    Args:
        shared: keep every buffer in one shared-memory :class:`Arena` (for a writer process; Linux only).

    Example:
        >>> from ckptkit.state import capture
        >>> model = torch.nn.Linear(2, 2)
        >>> snap = Snapshotter()
        >>> before = model.weight.detach().clone()
        >>> copied = snap.take(capture({"model": model}, rng=False))
        >>> _ = model.weight.data.add_(1)       # training goes on...
        >>> torch.equal(copied[0].tensors["weight"], before)   # ...the snapshot does not move
        True
    """

    def __init__(self, shared: bool = False) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.bytes = 0
        self.shared = shared
        self.arena: Arena | None = None

    def take(self, captured: list[Captured]) -> list[Captured]:
        """Copies of ``captured`` whose tensors live in this snapshotter's buffers (valid until the next take)."""
        if self.shared:
            self._layout(captured)
        out = []
        cuda = False
        seen: set[tuple[str, str]] = set()
        for comp in captured:
            tensors = {}
            for key, t in comp.tensors.items():
                slot = (comp.name, key)
                seen.add(slot)
                src = t.detach()
                buf = self._buffers.get(slot)
                if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                    pin = src.is_cuda
                    buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
                    self._buffers[slot] = buf
                if src.is_cuda:
                    cuda = True
                    buf.copy_(src, non_blocking=True)  # asynchronous into pinned memory; synchronous otherwise
                else:
                    buf.copy_(src)
                tensors[key] = buf
            out.append(replace(comp, tensors=tensors))
        if cuda:
            torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads them
        for slot in set(self._buffers) - seen:
            del self._buffers[slot]  # components or tensors that are gone: free their memory
        self.bytes = sum(b.numel() * b.element_size() for b in self._buffers.values())
        return out

    def _layout(self, captured: list[Captured]) -> None:
        """Shared mode: unless every tensor already has a buffer of its shape and dtype (and no buffer is left
        over), lay all of them out afresh in a new arena (the old one is freed once nothing refers to it)."""
        wanted = {(c.name, k): t for c in captured for k, t in c.tensors.items()}
        if (
            self.arena is not None
            and set(wanted) == set(self._buffers)
            and all(self._buffers[s].shape == t.shape and self._buffers[s].dtype == t.dtype for s, t in wanted.items())
        ):
            return
        offsets: dict[tuple[str, str], int] = {}
        size = 0
        for slot, t in wanted.items():
            offsets[slot] = size
            size += -(-(t.numel() * t.element_size()) // ALIGN) * ALIGN
        old = self.arena
        self.arena = _new_arena(size, 0 if old is None else old.generation + 1)
        if old is not None:
            old.close()
        self._buffers = {slot: arena_view(self.arena.base, offsets[slot], t.dtype, list(t.shape))
                         for slot, t in wanted.items()}  # fmt: skip
