"""A multi-rank DCP writer for tests/test_dcp_multirank.py: run by torchrun-style environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) on the gloo backend; saves ``{"model": model.state_dict(), "optimizer":
opt.state_dict()}`` with ``torch.distributed.checkpoint.save`` (the optimizer keyed by position, as
``optimizer.state_dict()`` keys it), and rank 0 writes the optimizer's state dict to ``<folder>-ref.pt`` as the
reference."""

from __future__ import annotations

import os
import sys

import torch


def build() -> torch.nn.Module:
    """Layers of one shape and no biases: every ordered choice of tensors fits every saved state shape."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8, bias=False) for _ in range(6)])


def main(folder: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo")
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).pow(2).sum().backward()
        opt.step()
    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=folder)
    if dist.get_rank() == 0:
        torch.save(opt.state_dict(), folder + "-ref.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)
