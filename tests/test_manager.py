"""CheckpointManager inside a training loop: cadence, restore latest/best/named, retention, lineage."""

from __future__ import annotations

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, Retention
from ckptkit.errors import CheckpointNotFoundError, CkptkitError
from ckptkit.storage import Repository


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {"model": model, "optimizer": opt}


def _step(state: dict[str, object]) -> None:
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()


def _names(mgr: CheckpointManager) -> list[str]:
    return [m.name for m in mgr.list()]


def test_fresh_run_then_resume_latest(repo_url: str) -> None:
    state = _state()
    mgr = CheckpointManager(repo_url, state, every=3)
    assert mgr.restore() is None  # fresh run
    saved = [s for s in range(1, 11) if (_step(state), mgr.save(s, metrics={"loss": 1.0 / s}))[1] is not None]
    assert saved == [3, 6, 9]
    assert _names(mgr) == ["step-00000003", "step-00000006", "step-00000009"]
    assert mgr.save(10, force=True) is not None
    mgr.close()
    with pytest.raises(CkptkitError, match="closed"):
        mgr.save(12)

    state2 = _state()
    mgr2 = CheckpointManager(repo_url, state2, every=3)
    result = mgr2.restore()
    assert result is not None and result.progress.global_step == 10
    for a, b in zip(state["model"].state_dict().values(), state2["model"].state_dict().values(), strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)
    assert mgr2.restore("step-00000003") is not None
    with pytest.raises(CheckpointNotFoundError, match="step-00000006"):
        mgr2.restore("nope")


def test_retention_rules_compose(repo_url: str) -> None:
    state = _state()
    losses = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.7, 5: 0.2, 6: 0.95, 7: 0.6, 8: 0.99}
    mgr = CheckpointManager(
        repo_url, state, retention=Retention(keep_last=2, keep_best=2, metric="loss", mode="min", keep_every=4)
    )
    for s, loss in losses.items():
        _step(state)
        mgr.save(s, metrics={"loss": loss})
    # last 2: 7, 8; best 2 by min loss: 2 (0.1), 5 (0.2); every 4: 4, 8
    assert _names(mgr) == [f"step-{s:08d}" for s in (2, 4, 5, 7, 8)]
    best = mgr.best()
    assert best is not None and best.name == "step-00000002"
    assert all(r.ok for r in ckptkit.verify(repo_url))
    # objects of pruned checkpoints were collected: only what the 5 survivors reference is stored
    referenced = {h for m in mgr.list() for h in m.objects}
    assert set(Repository(repo_url).list_objects()) == referenced


def test_retention_max_mode_and_restore_best(repo_url: str) -> None:
    state = _state()
    mgr = CheckpointManager(repo_url, state, retention=Retention(keep_best=1, metric="acc", mode="max"))
    for s, acc in enumerate([0.5, 0.9, 0.7, float("nan")], start=1):
        _step(state)
        mgr.save(s, metrics={"acc": acc})
    assert _names(mgr) == ["step-00000002", "step-00000004"]  # the best, and the newest (always kept)
    result = CheckpointManager(repo_url, _state(), retention=mgr.retention).restore(which="best")
    assert result is not None and result.manifest.name == "step-00000002"


def test_retention_never_deletes_the_checkpoint_the_run_resumed_from(repo_url: str) -> None:
    state = _state()
    mgr = CheckpointManager(repo_url, state)
    for s in (1, 2, 3):
        mgr.save(s)
    mgr2 = CheckpointManager(repo_url, _state(), retention=Retention(keep_last=1))
    mgr2.restore("step-00000001")
    for s in (4, 5, 6):
        mgr2.save(s)
    assert _names(mgr2) == ["step-00000001", "step-00000006"]


def test_lineage_records_init_train_and_resume(repo_url: str) -> None:
    state = _state()
    mgr = CheckpointManager(repo_url, state)
    a = mgr.save(1)
    b = mgr.save(2)
    assert a is not None and b is not None
    assert a.lineage.relation == "init" and a.lineage.parents == []
    assert b.lineage.parents[0].id == a.id and b.lineage.parents[0].relation == "train"
    mgr2 = CheckpointManager(repo_url, _state())
    mgr2.restore()
    c = mgr2.save(3)
    assert c is not None and c.lineage.relation == "resume"
    assert c.lineage.parents[0].id == b.id and c.lineage.run != b.lineage.run


def test_options_are_validated_when_the_manager_is_built(repo_url: str) -> None:
    state = _state()
    with pytest.raises(ValueError, match="every"):
        CheckpointManager(repo_url, state, every=0)
    with pytest.raises(ValueError, match="metric"):
        Retention(keep_best=2)
    with pytest.raises(ValueError, match="keep_best"):
        Retention(metric="loss")
    with pytest.raises(ValueError, match="mode"):
        Retention(keep_best=1, metric="loss", mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keeps nothing"):
        Retention()
    with pytest.raises(ValueError, match="keep_last"):
        Retention(keep_last=0)
    with pytest.raises(ValueError, match="name_format"):
        CheckpointManager(repo_url, state, name_format="ckpt/{step}")
    with pytest.raises(ValueError, match="name_format"):
        CheckpointManager(repo_url, state, name_format="{missing}")
    with pytest.raises(TypeError, match="Retention"):
        CheckpointManager(repo_url, state, retention={"keep_last": 2})  # type: ignore[arg-type]
    with pytest.raises(CkptkitError, match="best"):
        CheckpointManager(repo_url, state).best()
    with pytest.raises(ValueError, match="step"):
        CheckpointManager(repo_url, state).save(-1)


def test_same_name_twice_is_refused_and_keeps_the_first(repo_url: str) -> None:
    state = _state()
    mgr = CheckpointManager(repo_url, state)
    first = mgr.save(5)
    _step(state)
    with pytest.raises(FileExistsError, match="immutable"):
        mgr.save(5)
    assert first is not None and ckptkit.inspect(repo_url, "step-00000005").id == first.id
