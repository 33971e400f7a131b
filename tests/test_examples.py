"""The examples in examples/ run as users run them, and do what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
