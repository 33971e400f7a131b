"""Retention applies to the run's own checkpoints: two runs sharing a repository (as the cloud guide suggests)
never prune each other, a resumed run prunes what it wrote before the crash, and a checkpoint another run resumed,
continued or transferred from is never pruned."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import ckptkit
from ckptkit import CheckpointManager, Retention


def _names(url: str) -> list[str]:
    return [m.name for m in ckptkit.api.checkpoints(url)]


def test_two_runs_in_one_repository_keep_their_own_checkpoints(repo_url: str) -> None:
    a = CheckpointManager(repo_url, {"model": torch.nn.Linear(2, 2)}, name_format="a-{step:04d}",
                          retention=Retention(keep_last=2))  # fmt: skip
    b = CheckpointManager(repo_url, {"model": torch.nn.Linear(2, 2)}, name_format="b-{step:04d}",
                          retention=Retention(keep_last=2))  # fmt: skip
    for step in range(1, 6):  # interleaved, as two jobs on one bucket
        a.save(step)
        b.save(step)
    a.close()
    b.close()
    assert sorted(_names(repo_url)) == ["a-0004", "a-0005", "b-0004", "b-0005"]
    assert all(r.ok for r in ckptkit.verify(repo_url))


def test_a_resumed_run_prunes_what_it_wrote_before_and_spares_other_runs(repo_url: str) -> None:
    other = CheckpointManager(repo_url, {"model": torch.nn.Linear(2, 2)}, name_format="other-{step:04d}")
    other.save(1)
    other.close()
    first = CheckpointManager(repo_url, {"model": torch.nn.Linear(2, 2)}, retention=Retention(keep_last=2))
    for step in range(1, 4):
        first.save(step)
    first.close()  # "crashed" after step 3
    resumed = CheckpointManager(repo_url, {"model": torch.nn.Linear(2, 2)}, retention=Retention(keep_last=2))
    assert resumed.restore(name="step-00000003") is not None
    for step in range(4, 7):
        resumed.save(step)
    resumed.close()
    # the resumed run is the same run: its old checkpoints go, keep_last=2 plus the one it resumed from
    assert sorted(_names(repo_url)) == ["other-0001", "step-00000003", "step-00000005", "step-00000006"]


def test_a_checkpoint_another_run_continued_from_is_never_pruned(repo_url: str) -> None:
    base = CheckpointManager(repo_url, {"model": torch.nn.Linear(2, 2)}, name_format="base-{step:04d}",
                             retention=Retention(keep_last=1))  # fmt: skip
    base.save(1)
    fine = CheckpointManager(repo_url, {"model": torch.nn.Linear(2, 2)}, name_format="fine-{step:04d}",
                             retention=Retention(keep_last=1))  # fmt: skip
    fine.continue_from("base-0001")
    fine.save(1)
    fine.save(2)
    fine.close()
    for step in range(2, 5):  # the base run goes on; its base-0001 is the fine-tune's parent
        base.save(step)
    base.close()
    names = _names(repo_url)
    assert "base-0001" in names and "base-0004" in names and "base-0002" not in names and "base-0003" not in names
    assert [n for n in names if n.startswith("fine")] == ["fine-0002"]
    assert all(r.ok for r in ckptkit.verify(repo_url))


def test_two_processes_sharing_a_repository_each_keep_their_last_two(tmp_path: Path) -> None:
    """The probe's setup, as users run it: two training processes on one repository, each keep_last=2."""
    repo = str(tmp_path / "shared")
    script = textwrap.dedent(f"""
        import sys, torch, ckptkit
        tag = sys.argv[1]
        mgr = ckptkit.CheckpointManager({repo!r}, {{"model": torch.nn.Linear(4, 4)}}, name_format=tag + "-{{step:04d}}",
                                        retention=ckptkit.Retention(keep_last=2))
        for step in range(1, 9):
            mgr.save(step)
        mgr.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in ("x", "y")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert sorted(_names(repo)) == ["x-0007", "x-0008", "y-0007", "y-0008"]
    assert all(r.ok for r in ckptkit.verify(repo))
