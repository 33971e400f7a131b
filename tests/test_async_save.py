"""Async save: returns once the state is in host memory; training may mutate parameters in place right away;
errors surface at the next save, wait or close; interpreter exit waits for the pending commit."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager
from ckptkit.storage import Repository


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))


def test_in_place_updates_after_save_returns_do_not_leak_into_the_checkpoint(repo_url: str) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    mgr = CheckpointManager(repo_url, {"model": model, "optimizer": opt}, async_save=True)
    expected = []
    for step in range(1, 6):
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
        expected.append({k: v.clone() for k, v in model.state_dict().items()})
        assert mgr.save(step) is None  # returned before the commit
        with torch.no_grad():  # the training loop mutates in place at once (pytorch #144657)
            for p in model.parameters():
                p.mul_(0).add_(step * 1000)
    last = mgr.wait()
    assert last is not None and last.name == "step-00000005"
    mgr.close()
    for step, want in enumerate(expected, start=1):
        fresh = _model()
        ckptkit.restore(repo_url, {"model": fresh}, f"step-{step:08d}", strict=False)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items()), f"step {step}"
    names = [m.name for m in ckptkit.api.checkpoints(repo_url)]
    assert names == [f"step-{s:08d}" for s in range(1, 6)]
    chain = [ckptkit.inspect(repo_url, n) for n in names]
    assert all(c.lineage.parents[0].id == p.id for p, c in itertools.pairwise(chain))


def test_buffers_are_reused_between_saves(repo_url: str) -> None:
    model = _model()
    mgr = CheckpointManager(repo_url, {"model": model}, async_save=True, rng=False)
    mgr.save(1)
    mgr.wait()
    assert mgr._snapshots is not None
    first = {k: v.data_ptr() for k, v in mgr._snapshots._buffers.items()}
    mgr.save(2)
    mgr.wait()
    assert {k: v.data_ptr() for k, v in mgr._snapshots._buffers.items()} == first
    mgr.close()


def _thread_nice(tid: int) -> int:
    """The nice value of this process's thread ``tid`` (Linux /proc)."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of stat, nice (the fields after the name start at field 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux only")
@pytest.mark.parametrize("nice", [None, 0, 19])
def test_the_background_writer_runs_at_a_lower_priority_than_training(tmp_path: Path, nice: int | None) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    kwargs = {} if nice is None else {"writer_nice": nice}
    model = _model()
    mgr = CheckpointManager(tmp_path / "repo", {"model": model}, async_save=True, rng=False, **kwargs)
    mgr.save(1)
    assert mgr.wait() is not None
    want = min(19, base + (10 if nice is None else nice))
    assert mgr._writer is not None and mgr._writer._thread.native_id is not None
    assert _thread_nice(mgr._writer._thread.native_id) == want
    assert os.getpriority(os.PRIO_PROCESS, 0) == base, "the training thread's priority changed"
    mgr.close()
    fresh = _model()
    ckptkit.restore(tmp_path / "repo", {"model": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.mark.parametrize("bad", [-1, 20, 2.5, True])
def test_writer_nice_out_of_range_is_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="writer_nice"):
        CheckpointManager(tmp_path / "repo", {"model": _model()}, async_save=True, writer_nice=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*.json"))


def test_a_background_error_is_raised_by_the_next_call_never_lost(repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    mgr = CheckpointManager(repo_url, {"model": model}, async_save=True)

    def broken(self: Repository, name: str, manifest: bytes) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Repository, "commit", broken)
    mgr.save(1)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2)  # the next save reports the failure of the previous one
    mgr.save(3)
    with pytest.raises(OSError, match="disk full"):
        mgr.wait()
    mgr.save(4)
    with pytest.raises(OSError, match="disk full"):
        mgr.close()
    monkeypatch.undo()
    assert Repository(repo_url).list() == []


def test_interpreter_exit_waits_for_the_pending_commit(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    script = textwrap.dedent(f"""
        import torch, ckptkit
        from ckptkit.storage import Repository
        real = Repository.commit
        def slow(self, name, manifest):
            import time; time.sleep(1.0); real(self, name, manifest)
        Repository.commit = slow
        model = torch.nn.Linear(512, 512)
        mgr = ckptkit.CheckpointManager({url!r}, {{"model": model}}, async_save=True)
        mgr.save(7)
        print("returned", flush=True)
    """)  # the script exits without wait() or close()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "returned" in out.stdout and "waiting for the checkpoint" in out.stderr
    assert Repository(url).list() == ["step-00000007"]
    assert all(r.ok for r in ckptkit.verify(url))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned-memory snapshot)")
def test_gpu_state_is_snapshotted_through_pinned_memory(tmp_path: Path) -> None:
    model = _model().cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256, device="cuda")).sum().backward()
    opt.step()
    want = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(str(tmp_path), {"model": model, "optimizer": opt}, async_save=True)
    mgr.save(1)
    assert mgr._snapshots is not None and all(b.is_pinned() for b in mgr._snapshots._buffers.values()
                                              if b.numel())  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    mgr.close()
    fresh = _model().cuda()
    result = ckptkit.restore(str(tmp_path), {"model": fresh}, strict=False)
    assert all(torch.equal(fresh.state_dict()[k].cpu(), v) for k, v in want.items())
    assert "cuda" in result.manifest.components["rng"].state  # type: ignore[operator]


@pytest.mark.parametrize("verb", ["transfer", "continue"])
def test_an_edge_set_while_a_save_is_being_written_is_recorded_by_the_next_save(
    repo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    """Lineage is decided on the caller's thread: a transfer_from (or continue_from) called while the background
    writer is still committing the previous save keeps its edge (the writer used to reset it to `train`)."""
    import threading

    source = str(tmp_path / "source")
    donor = _model()
    ckptkit.save(source, {"model": donor}, "donor")
    model = _model()
    ckptkit.save(repo_url, {"model": model}, "base")  # a checkpoint to continue from
    mgr = CheckpointManager(repo_url, {"model": model}, async_save=True, rng=False)
    writing, release = threading.Event(), threading.Event()
    original = Repository.write_objects

    def slow(self: Repository, objects: list) -> int:  # type: ignore[type-arg]
        if threading.current_thread().name == "ckptkit-save":  # only the background writer is held
            writing.set()
            assert release.wait(30), "the test never released the writer"
        return original(self, objects)

    monkeypatch.setattr(Repository, "write_objects", slow)
    mgr.save(1)
    assert writing.wait(30)  # the writer holds save 1, not yet committed
    if verb == "transfer":
        mgr.transfer_from(source)
    else:
        mgr.continue_from("base")
    release.set()
    mgr.save(2)
    mgr.close()
    second = ckptkit.inspect(repo_url, "step-00000002")
    assert second.lineage.relation == verb
    first = ckptkit.inspect(repo_url, "step-00000001")
    if verb == "transfer":  # the weights came from save 1 (still being written at the transfer) and the donor
        assert [(p.relation, p.name) for p in second.lineage.parents] == [("train", "step-00000001"),
                                                                           ("transfer", "donor")]  # fmt: skip
        assert second.lineage.parents[0].id == first.id
        assert second.lineage.parents[1].id == ckptkit.inspect(source, "donor").id
        assert "plan" in second.lineage.parents[1].changes
    else:
        assert [(p.relation, p.name) for p in second.lineage.parents] == [("continue", "base")]
    # The model was saved as "base" before this manager existed: its first save follows on from it.
    assert (first.lineage.relation, first.lineage.parents[0].name) == ("train", "base")
    mgr3 = CheckpointManager(repo_url, {"model": model}, async_save=True, rng=False)
    mgr3.save(3)  # an ordinary save after the edge: `train` from the checkpoint before it
    mgr3.save(4)
    mgr3.close()
    assert ckptkit.inspect(repo_url, "step-00000004").lineage.parents[0].name == "step-00000003"
