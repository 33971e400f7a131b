"""The examples in examples/ run as users run them, and do what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import ckptkit

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_plain_loop_example_runs_and_resumes(tmp_path: Path) -> None:
    url = str(tmp_path / "ckpts")
    cmd = [sys.executable, str(EXAMPLES / "plain_loop.py"), url]
    first = subprocess.run([*cmd, "--steps", "100"], capture_output=True, text=True, check=True)
    assert "starting at step 0" in first.stdout
    second = subprocess.run([*cmd, "--steps", "150"], capture_output=True, text=True, check=True)
    assert "starting at step 100 (resumed from step-00000100)" in second.stdout
    names = [m.name for m in ckptkit.api.checkpoints(url)]
    assert "step-00000150" in names and len(names) <= 3  # keep_last=2 plus the best (or the resumed-from)
    assert all(r.ok for r in ckptkit.verify(url))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def _weights(url: str, name: str) -> dict[str, object]:
    m = ckptkit.inspect(url, name)
    from ckptkit.engine.tensors import load_tensors
    from ckptkit.storage import Repository

    return load_tensors(Repository(url), m, ["model"])["model"]


def test_automl_example_fit_load_fit_more_and_resume_after_a_collapse(tmp_path: Path) -> None:
    script = str(EXAMPLES / "automl.py")
    crashed, clean = str(tmp_path / "crashed"), str(tmp_path / "clean")
    for url in (crashed, clean):
        assert _run(script, url, "fit1").returncode == 0
    dead = _run(script, crashed, "fit2", "--crash-at", "25")
    assert dead.returncode == -9 and "collapse at step 85" in dead.stdout
    resumed = _run(script, crashed, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed step-00000085 at step 85: exact" in resumed.stdout and "resume: step 120" in resumed.stdout
    assert _run(script, clean, "fit2").returncode == 0
    a, b = _weights(crashed, "step-00000120"), _weights(clean, "step-00000120")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # type: ignore[arg-type]
    m = ckptkit.inspect(crashed, "step-00000120")
    assert [d.name for d in m.data] == ["data-1", "data-2"]


def test_pipeline_example_changes_epochs_and_batch_size_and_continues(tmp_path: Path) -> None:
    url = str(tmp_path / "pipe")
    out = _run(str(EXAMPLES / "pipeline.py"), url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("1. trained 3 epochs (batch 32): step 39")
    assert "recorded: continue from epochs-3" in lines[1] and "'loader.batch_size'" in lines[1]
    assert float(lines[1].split("loss ")[1].split(";")[0]) < 0.05  # the restored PCA feeds the head
    assert lines[2].startswith("3. started from bare files: 4 loaded")
    assert lines[3].startswith("4. continued from the latest (epochs-6) to 8 epochs")
    assert ckptkit.inspect(url + "-from-files").lineage.relation == "import"
