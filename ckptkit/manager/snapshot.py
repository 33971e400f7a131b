"""Host-memory snapshots of captured state, for async save: training may change tensors in place the moment
``save`` returns, so the background writer must only ever read copies.

Buffers are kept between saves and reused when shape and dtype match, so a steady training loop allocates
once. Tensors on a GPU are copied into pinned host buffers with non-blocking copies, then synchronised once.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ckptkit.state import Captured

__all__ = ["Snapshotter"]


class Snapshotter:
    """Copies the tensors of captured components into reusable host buffers.

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

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.bytes = 0

    def take(self, captured: list[Captured]) -> list[Captured]:
        """Copies of ``captured`` whose tensors live in this snapshotter's buffers (valid until the next take)."""
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
                    buf.copy_(src, non_blocking=True)
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
