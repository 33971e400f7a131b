"""Explicit continue: more steps under each schedule policy, new data, a changed batch size or optimizer
hyperparameters, and starting from bare files another tool wrote. LR sequences are asserted step by step."""

from __future__ import annotations

import fractions
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ckptkit
from ckptkit import CheckpointManager
from ckptkit.errors import UnsupportedStateError
from ckptkit.schema import DataSegment
from ckptkit.training import PlannedLR, ResumableLoader

DS = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))


def _state(batch: int = 8, data: Any = DS) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    return {"model": model, "optimizer": opt, "scheduler": PlannedLR(opt, total_steps=10, warmup_steps=2),
            "loader": ResumableLoader(data, batch, seed=3)}  # fmt: skip


def _train(state: dict[str, Any], mgr: CheckpointManager, start: int, stop: int) -> list[float]:
    """Train optimizer steps start+1..stop; return the LR each step used."""
    model, opt, sched, loader = state["model"], state["optimizer"], state["scheduler"], state["loader"]
    lrs: list[float] = []
    step = start
    while step < stop:
        for x, y in loader:
            lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            step += 1
            mgr.save(step, samples_seen=step * loader.batch_size if start == 0 else 0)
            if step >= stop:
                break
    return lrs


def _first_run(url: str) -> tuple[list[float], float]:
    state = _state()
    mgr = CheckpointManager(url, state, data=DataSegment(name="part-1", size=64, fingerprint="p1"))
    lrs = _train(state, mgr, 0, 6)
    return lrs, state["optimizer"].param_groups[0]["lr"]


def test_extend_continues_the_shape_from_the_current_lr(tmp_path: Path) -> None:
    url = str(tmp_path)
    lrs, current = _first_run(url)
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1])  # warmup 2 steps, then cosine
    state = _state()
    mgr = CheckpointManager(url, state)
    mgr.continue_from(schedule="extend", total_steps=20)
    new = _train(state, mgr, 6, 20)
    assert new[0] == pytest.approx(current)  # no jump: the first new LR is the LR in effect when it stopped
    assert all(a > b for a, b in itertools.pairwise(new))  # still decaying, stretched over 14 steps
    assert state["scheduler"].lr_at(20) == pytest.approx(0.0, abs=1e-12)
    u0 = state["scheduler"].segments[-1]["u0"]
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * (u0 + (1 - u0) * t / 14))) for t in range(14)]
    assert new == pytest.approx(expected)
    assert ckptkit.inspect(url, "step-00000007").lineage.relation == "continue"
    assert ckptkit.inspect(url).lineage.relation == "train"
    changes = ckptkit.inspect(url, "step-00000007").lineage.parents[0].changes
    assert changes["schedule"] == "extend" and changes["total_steps"] == [10, 20]


def test_restart_warms_up_again_from_the_current_weights(tmp_path: Path) -> None:
    url = str(tmp_path)
    _first_run(url)
    state = _state()
    mgr = CheckpointManager(url, state)
    weights = ckptkit.inspect(url).components["model"].tensors["weight"].object
    mgr.continue_from(schedule="restart", total_steps=16, warmup_steps=4, lr=0.2)
    assert ckptkit.inspect(url).components["model"].tensors["weight"].object == weights
    new = _train(state, mgr, 6, 16)
    assert new[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])  # a fresh warmup to the new peak
    assert new[4] == pytest.approx(0.2) and new[-1] < new[4]
    assert state["scheduler"].base_lrs == [0.2]


def test_constant_holds_the_lr(tmp_path: Path) -> None:
    url = str(tmp_path)
    _, current = _first_run(url)
    state = _state()
    mgr = CheckpointManager(url, state)
    mgr.continue_from(schedule="constant", total_steps=12)
    assert _train(state, mgr, 6, 12) == pytest.approx([current] * 6)
    state = _state()
    mgr = CheckpointManager(url, state)
    mgr.continue_from(schedule="constant", total_steps=30, lr=0.003)
    assert _train(state, mgr, 12, 16) == pytest.approx([0.003] * 4)


def test_changed_batch_size_keeps_the_position_in_samples(tmp_path: Path) -> None:
    url = str(tmp_path)
    _first_run(url)  # 6 steps of 8 samples: 48 of 64 samples of epoch 0 consumed
    state = _state(batch=4)
    mgr = CheckpointManager(url, state)
    mgr.continue_from(schedule="extend", total_steps=12)
    loader = state["loader"]
    assert (loader.epoch, loader.samples_in_epoch, loader.batches_in_epoch) == (0, 48, 12)
    seen = [len(x) for x, _ in loader]
    assert seen == [4, 4, 4, 4]  # the remaining 16 samples of the epoch, 4 at a time
    mgr.save(7, samples_seen=48 + 4)
    changes = ckptkit.inspect(url, "step-00000007").lineage.parents[0].changes
    assert changes["loader.batch_size"] == [8, 4]


def test_changed_optimizer_hyperparameters_are_applied_and_recorded(tmp_path: Path) -> None:
    url = str(tmp_path)
    _first_run(url)
    state = _state()
    mgr = CheckpointManager(url, state, hparams={"lr": 0.1, "weight_decay": 0.01})
    mgr.continue_from(optimizer_hparams={"weight_decay": 0.1, "betas": (0.8, 0.99)},
                      hparams={"lr": 0.1, "weight_decay": 0.1})  # fmt: skip
    group = state["optimizer"].param_groups[0]
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.8, 0.99)
    saved = mgr.save(7)
    assert saved is not None
    changes = saved.lineage.parents[0].changes
    assert changes["optimizer.weight_decay"] == [0.01, 0.1]
    assert changes["hparams"] == {"lr": [None, 0.1], "weight_decay": [None, 0.1]}  # the first run recorded none
    assert saved.hparams == {"lr": 0.1, "weight_decay": 0.1}


def test_new_data_starts_a_new_segment_from_its_beginning(tmp_path: Path) -> None:
    url = str(tmp_path)
    _first_run(url)
    part2 = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    state = _state(data=part2)
    mgr = CheckpointManager(url, state)
    result = mgr.continue_from(new_data=DataSegment(name="part-2", size=32, fingerprint="p2"),
                               schedule="extend", total_steps=10)  # fmt: skip
    assert result.progress.samples_seen == 48
    loader = state["loader"]
    assert (loader.epoch, loader.samples_in_epoch) == (0, 0)  # the new data from its start
    assert [len(x) for x, _ in loader] == [8, 8, 8, 8]
    saved = mgr.save(10, samples_seen=48 + 32)
    assert saved is not None
    assert [(d.name, d.samples_consumed) for d in saved.data] == [("part-1", 48), ("part-2", 32)]
    assert saved.lineage.parents[0].changes["data_added"]["name"] == "part-2"


def test_continue_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    url = str(tmp_path)
    with pytest.raises(FileNotFoundError):
        CheckpointManager(url, _state()).continue_from()
    _first_run(url)
    with pytest.raises(ValueError, match="needs total_steps"):
        CheckpointManager(url, _state()).continue_from(schedule="extend")
    plain = _state()
    plain["scheduler"] = torch.optim.lr_scheduler.StepLR(plain["optimizer"], 3)
    with pytest.raises(ValueError, match="PlannedLR"):
        CheckpointManager(url, plain).continue_from(schedule="extend", total_steps=20)
    with pytest.raises(ValueError, match="after the current step"):
        CheckpointManager(url, _state()).continue_from(schedule="extend", total_steps=3)
    with pytest.raises(ValueError, match="keeps the LR continuous"):
        CheckpointManager(url, _state()).continue_from(schedule="extend", total_steps=20, lr=0.5)


def test_start_from_bare_weights_and_optimizer_files(tmp_path: Path) -> None:
    torch.manual_seed(5)
    other = torch.nn.Linear(4, 1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1, weight_decay=0.01)
    other(torch.randn(2, 4)).sum().backward()
    other_opt.step()
    torch.save({"state_dict": other.state_dict(), "epoch": 3}, tmp_path / "model.pt")
    torch.save(other_opt.state_dict(), tmp_path / "optim.pt")
    save_file(other.state_dict(), str(tmp_path / "model.safetensors"))
    for weights in ("model.pt", "model.safetensors"):
        state = _state()
        mgr = CheckpointManager(str(tmp_path / f"repo-{weights}"), state)
        report = mgr.start_from_files(str(tmp_path / weights), str(tmp_path / "optim.pt"))
        assert report.ok and torch.equal(state["model"].weight, other.weight)
        assert torch.equal(state["optimizer"].state[state["model"].weight]["exp_avg"],
                           other_opt.state[other.weight]["exp_avg"])  # fmt: skip
        saved = mgr.save(1)
        assert saved is not None and saved.lineage.relation == "import" and saved.lineage.parents == []
        assert saved.lineage.source is not None and saved.lineage.source["weights"].endswith(weights)

    torch.save({"weight": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")  # an arbitrary class: needs unpickling
    with pytest.raises(UnsupportedStateError, match="weights_only"):
        CheckpointManager(str(tmp_path / "r"), _state()).start_from_files(str(tmp_path / "evil.pt"))
