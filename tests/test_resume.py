"""Exact resume: real subprocesses killed with SIGKILL, resumed, and compared tensor by tensor with an
uninterrupted run (dropout, 2 loader workers with random augmentation, AdamW + warmup/cosine, gradient
accumulation, GradScaler with bf16 autocast, an EMA; an MLP, a tiny HF BERT and a tiny timm ResNet)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.api import checkpoints

WORKER = Path(__file__).parent / "resume_worker.py"
sys.path.insert(0, str(Path(__file__).parent))
import resume_worker  # noqa: E402


def _run(url: str, model: str, loader: str, kill: tuple[str, int] | None = None) -> list[str]:
    """Run the worker; with ``kill`` SIGKILL it after step N ("after") or inside the save of step N ("in_save")."""
    cmd = [sys.executable, str(WORKER), url, "--model", model, "--loader", loader]
    if kill and kill[0] == "in_save":
        cmd += ["--slow-save", str(kill[1])]
    trigger = None if kill is None else (f"SAVING {kill[1]}" if kill[0] == "in_save" else f"STEP {kill[1]}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.strip())
        if trigger and line.strip() == trigger:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    err = proc.stderr.read() if proc.stderr else ""
    if kill:
        assert proc.returncode == -signal.SIGKILL, f"worker was not killed: {lines[-3:]} {err[-2000:]}"
    else:
        assert proc.returncode == 0, err[-3000:]
    return lines


def _final(url: str, model: str, loader: str) -> dict[str, torch.Tensor]:
    state = resume_worker.build(model, loader)
    ckptkit.restore(url, state, "final", rng=False)
    out: dict[str, Any] = {f"model.{k}": v for k, v in state["model"].state_dict().items()}
    for i, s in state["optimizer"].state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items()})
    out.update({f"ema.{k}": v for k, v in state["ema"].shadow.items()})
    out["scaler.scale"] = torch.tensor(state["scaler"].get_scale())
    out["lr"] = torch.tensor(state["scheduler"].get_last_lr())
    return out


def _assert_same(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"


KILLS = [("after", 3), ("after", 10), ("in_save", 13)]  # mid-epoch, at an epoch boundary, during a save
# The kill points test the loader and the commit, which do not depend on the model: the MLP goes through all
# three; BERT and timm (whose adapters capture and restore differently) through the hardest one, a kill inside a
# save after an epoch boundary, resumed from the checkpoint before it (CI's time budget: each run is a process).
ONE_KILL = [("in_save", 13)]


@pytest.mark.parametrize(
    ("model", "loader", "kills"),
    [
        ("mlp", "resumable", KILLS),
        ("bert", "resumable", ONE_KILL),
        ("timm", "resumable", ONE_KILL),
        ("mlp", "position", [("after", 3), ("in_save", 10)]),
        ("mlp", "stateful", [("after", 3), ("in_save", 10)]),
    ],
)
def test_resume_after_sigkill_is_bit_exact(tmp_path: Path, model: str, loader: str, kills: list[Any]) -> None:
    ref_url, url = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    _run(ref_url, model, loader)
    for kill in kills:
        lines = _run(url, model, loader, kill)
        if kill[0] == "in_save":
            assert f"step-{kill[1]:08d}" not in [m.name for m in checkpoints(url)], "a half-written save is listed"
            assert (Path(url) / "pending").exists() and any((Path(url) / "pending").iterdir())
        assert any(line.startswith("STEP") for line in lines)
    lines = _run(url, model, loader)
    resumed = [line for line in lines if line.startswith("RESUMED")]
    assert resumed and resumed[0].endswith("fidelity: exact"), resumed
    _assert_same(_final(ref_url, model, loader), _final(url, model, loader))
    assert all(r.ok for r in ckptkit.verify(url))


def test_resume_without_loader_state_is_reported_not_exact(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    ckptkit.save(str(tmp_path), {"model": model}, "a")
    result = ckptkit.restore(str(tmp_path), {"model": model})
    assert not result.fidelity.exact
    assert any("no data-loader state" in i for i in result.fidelity.issues)


def test_fidelity_reports_each_missing_piece(tmp_path: Path) -> None:
    url = str(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = ckptkit.training.ResumableLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), 2)
    ckptkit.save(url, {"model": model, "optimizer": opt, "loader": loader}, "full")
    assert ckptkit.restore(url, {"model": model, "optimizer": opt, "loader": loader}, "full").fidelity.exact
    issues = ckptkit.restore(url, {"model": model, "loader": loader}, "full").fidelity.issues
    assert any("optimizer 'optimizer' was not restored" in i for i in issues)
    issues = ckptkit.restore(url, {"model": model, "optimizer": opt, "loader": loader}, "full", rng=False).fidelity.issues
    assert issues == ["RNG not restored (rng=False)"]
    ckptkit.save(url, {"model": model, "optimizer": opt, "loader": loader}, "norng", rng=False)
    issues = ckptkit.restore(url, {"model": model, "optimizer": opt, "loader": loader}, "norng").fidelity.issues
    assert any("no RNG state" in i for i in issues)
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        issues = ckptkit.restore(url, {"model": model, "optimizer": opt, "loader": loader}, "full").fidelity.issues
    finally:
        torch.backends.cudnn.benchmark = old
    assert any("cudnn.benchmark" in i for i in issues)


def test_cuda_rng_count_mismatch_is_reported(tmp_path: Path) -> None:
    """A checkpoint with CUDA RNG restored where no CUDA device is visible says so (and restores the rest)."""
    from ckptkit.state.restore import Saved, restore_rng

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    import random

    import numpy as np

    from ckptkit.format import encode

    rng = encode({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                  "cuda": [torch.zeros(16, dtype=torch.uint8)]}, "rng")  # fmt: skip
    problems = restore_rng(Saved("rng", rng.json, rng.tensors, {}, None, {}))
    assert problems == ["checkpoint has RNG state of 1 CUDA device(s), this process sees 0"]


def test_latest_corrupt_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    url = str(tmp_path)
    model = torch.nn.Linear(4, 4)
    mgr = ckptkit.CheckpointManager(url, {"model": model})
    mgr.save(1)
    with torch.no_grad():
        model.weight.add_(1)
    bad = mgr.save(2)
    assert bad is not None
    obj = next(h for h in bad.objects if h not in ckptkit.inspect(url, "step-00000001").objects)
    path = Path(url) / "objects" / obj[:2] / obj
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    fresh = torch.nn.Linear(4, 4)
    result = ckptkit.CheckpointManager(url, {"model": fresh}).restore()
    assert result is not None and result.manifest.name == "step-00000001"
    assert result.skipped[0][0] == "step-00000002" and "corrupt" in result.skipped[0][1]
    with pytest.raises(ckptkit.errors.CorruptObjectError):  # asked for by name: no silent fallback
        ckptkit.restore(url, {"model": fresh}, "step-00000002")
