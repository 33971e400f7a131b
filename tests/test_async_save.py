"""Async save: returns once the state is in host memory; training may mutate parameters in place right away;
errors surface at the next save, wait or close; interpreter exit waits for the pending commit."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
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


# --- writer="process" --------------------------------------------------------------------------------------

needs_process_writer = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the writer process is Linux only")


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    return model, opt


@needs_process_writer
def test_a_writer_process_commits_the_same_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    """The same state saved by a writer thread and by a writer process: the same objects (names are hashes of
    the bytes), a manifest that verifies, and a restore equal to the state at the save, not after it."""
    model, opt = _trained()
    by: dict[str, ckptkit.schema.Manifest] = {}
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for writer in ("thread", "process"):
        url = str(tmp_path / writer)
        mgr = CheckpointManager(url, {"model": model, "optimizer": opt}, async_save=True, rng=False, writer=writer,
                                hparams={"lr": 0.1})  # fmt: skip
        assert mgr.save(3, metrics={"loss": 0.5}) is None
        with torch.no_grad():  # training goes on at once; the writer process reads the snapshot, not the model
            for p in model.parameters():
                p.add_(1)
        last = mgr.wait()
        assert last is not None
        by[writer] = last
        mgr.close()
        model.load_state_dict(want)  # the state at the save, for the next writer
        assert all(r.ok for r in ckptkit.verify(url))
        fresh = _model()
        ckptkit.restore(url, {"model": fresh}, strict=False)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
    thread, process = by["thread"], by["process"]
    assert process.objects.keys() == thread.objects.keys()
    assert process.components["model"].tensors == thread.components["model"].tensors
    assert process.metrics == {"loss": 0.5} and process.hparams == thread.hparams
    assert process.progress == thread.progress


@needs_process_writer
def test_a_writer_process_reuses_its_shared_buffers_and_follows_a_changed_state(tmp_path: Path) -> None:
    model = _model()
    mgr = CheckpointManager(tmp_path / "repo", {"model": model}, async_save=True, rng=False, writer="process",
                            retention=ckptkit.Retention(keep_last=1))  # fmt: skip
    mgr.save(1)
    mgr.wait()
    assert mgr._snapshots is not None and mgr._snapshots.arena is not None
    arena, pid = mgr._snapshots.arena, mgr._writer.pid  # type: ignore[union-attr]
    mgr.save(2)
    mgr.wait()
    assert mgr._snapshots.arena is arena and mgr._writer.pid == pid  # type: ignore[union-attr]
    model.append(torch.nn.Linear(256, 3))  # a new tensor: a new arena, handed to the same writer process
    mgr.save(3)
    assert mgr.wait() is not None
    assert mgr._snapshots.arena.generation == arena.generation + 1 and mgr._writer.pid == pid  # type: ignore[union-attr]
    assert [m.name for m in mgr.list()] == ["step-00000003"]  # retention ran after the child's commit
    mgr.close()
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 3))
    ckptkit.restore(tmp_path / "repo", {"model": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


@needs_process_writer
def test_a_writer_process_runs_at_the_lower_priority(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "repo", {"model": _model()}, async_save=True, rng=False, writer="process",
                            writer_nice=7)  # fmt: skip
    mgr.save(1)
    mgr.wait()
    pid = mgr._writer.pid  # type: ignore[union-attr]
    assert pid is not None and pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    mgr.close()


@needs_process_writer
def test_an_error_in_the_writer_process_is_raised_by_the_next_call_with_its_type(tmp_path: Path) -> None:
    model = _model()
    url = tmp_path / "repo"
    mgr = CheckpointManager(url, {"model": model}, async_save=True, rng=False, writer="process")
    mgr.save(1)
    mgr.wait()
    objects = url / "objects"
    shutil.rmtree(objects)
    objects.write_text("not a directory")  # the child's next write fails (as root too, unlike a chmod)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)  # every object is new
    mgr.save(2)
    with pytest.raises(OSError) as info:
        mgr.wait()
    assert "writer process" in str(info.value.__cause__)
    objects.unlink()
    mgr.save(3)  # the same writer process goes on
    assert mgr.wait() is not None
    mgr.close()
    assert Repository(str(url)).list() == ["step-00000001", "step-00000003"]


@needs_process_writer
def test_a_writer_process_that_dies_fails_its_save_loudly_and_the_next_save_starts_another(tmp_path: Path) -> None:
    model = _model()
    url = tmp_path / "repo"
    mgr = CheckpointManager(url, {"model": model}, async_save=True, rng=False, writer="process")
    mgr.save(1)
    mgr.wait()
    pid = mgr._writer.pid  # type: ignore[union-attr]
    assert pid is not None
    # The child dies holding save 2: stopped first, so that the save is sent to it (a child already seen dead
    # is replaced before sending, and that save succeeds), then killed while the writer waits for its answer.
    os.kill(pid, signal.SIGSTOP)
    mgr.save(2)
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ckptkit.errors.StorageError, match="writer process exited"):
        mgr.wait()  # never silently lost
    mgr.save(3)
    assert mgr.wait() is not None and mgr._writer.pid not in (None, pid)  # type: ignore[union-attr]
    mgr.close()
    assert Repository(str(url)).list() == ["step-00000001", "step-00000003"]
    assert all(r.ok for r in ckptkit.verify(str(url)))


def test_interpreter_exit_waits_for_the_writer_process(tmp_path: Path) -> None:
    if not hasattr(os, "memfd_create"):
        pytest.skip("the writer process is Linux only")
    url = str(tmp_path / "repo")
    script = textwrap.dedent(f"""
        import torch, ckptkit
        model = torch.nn.Linear(512, 512)
        mgr = ckptkit.CheckpointManager({url!r}, {{"model": model}}, async_save=True, writer="process")
        mgr.save(7)
        print("returned", flush=True)
    """)  # exits without wait() or close(), while the child is still starting
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "returned" in out.stdout and "waiting for the checkpoint" in out.stderr
    assert Repository(url).list() == ["step-00000007"]
    assert all(r.ok for r in ckptkit.verify(url))


@pytest.mark.parametrize("kwargs", [{"writer": "fork"}, {"writer": "process", "async_save": False},
                                    {"writer": "process", "url": "memory://ckptkit-writer-process"}])  # fmt: skip
def test_a_writer_process_where_it_cannot_work_is_refused_when_the_manager_is_built(
    tmp_path: Path, kwargs: dict[str, object]
) -> None:
    options = {"async_save": True, **kwargs}
    url = str(options.pop("url", tmp_path / "repo"))
    with pytest.raises(ValueError, match="writer"):
        CheckpointManager(url, {"model": _model()}, **options)  # type: ignore[arg-type]
