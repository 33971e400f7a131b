"""ResumableLoader across data-parallel ranks: every rank draws the same epoch order and takes its share; the
saved position is the whole epoch's, so a run resumed on another number of ranks re-splits the rest of the epoch
with no sample repeated or skipped, and ckptkit.distributed.load says so in its fidelity report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptkit.errors import InvalidArgumentError
from ckptkit.training import ResumableLoader

N = 37  # not a multiple of any batch x world size used here: tails are uneven


def _loaders(world: int, batch: int = 4) -> list[ResumableLoader]:
    data = torch.utils.data.TensorDataset(torch.arange(N))
    return [ResumableLoader(data, batch, seed=5, rank=r, world_size=world) for r in range(world)]


def _take(loader: ResumableLoader, batches: int | None) -> list[int]:
    out: list[int] = []
    for i, (x,) in enumerate(loader):
        out += x.tolist()
        if batches is not None and i + 1 == batches:
            break
    return out


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (1, 2), (2, 1), (2, 2)])
def test_a_resume_on_another_world_size_sees_every_sample_of_the_epoch_once(before: int, after: int) -> None:
    first = _loaders(before)
    seen = [i for lo in first for i in _take(lo, 2)]  # every rank takes 2 batches in lockstep
    states = [lo.state_dict() for lo in first]
    assert all(s == states[0] for s in states)  # the position is the epoch's, the same on every rank
    assert states[0]["samples_in_epoch"] == len(seen) == 2 * 4 * before
    second = _loaders(after)
    for lo in second:
        lo.load_state_dict(states[0])
        assert lo.resplit == ((before, after) if before != after else None)
    rest = [_take(lo, None) for lo in second]
    assert sorted(seen + [i for r in rest for i in r]) == list(range(N))  # each sample exactly once
    assert max(map(len, rest)) - min(map(len, rest)) <= 1  # shared evenly (one fewer at the tail at most)
    assert all(lo.epoch == 1 and lo.samples_in_epoch == 0 for lo in second)


def test_one_process_is_unchanged_and_bad_ranks_are_refused() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(N))
    plain, ranked = ResumableLoader(data, 4, seed=5), ResumableLoader(data, 4, seed=5, rank=0, world_size=1)
    assert _take(plain, None) == _take(ranked, None) and len(plain) == len(ranked) == 10
    with pytest.raises(InvalidArgumentError, match="0 <= rank < world_size"):
        ResumableLoader(data, 4, rank=2, world_size=2)


def test_distributed_load_reports_the_resplit(tmp_path: Path) -> None:
    from ckptkit import distributed

    saver = _loaders(2)[0]
    _take(saver, 1)
    distributed.save(str(tmp_path), {"loader": saver}, "a", rng=False)
    loader = _loaders(3)[1]
    result = distributed.load(str(tmp_path), {"loader": loader}, "a", rng=False)
    assert loader.samples_in_epoch == 8 and loader.resplit == (2, 3)
    assert any("data position of 'loader' re-split from 2 to 3 rank(s) at sample 8 of epoch 0" in i
               for i in result.fidelity.issues), result.fidelity.issues
