"""Smoke test of bench/save_load.py: it runs end to end and reports finite positive ratios.

The targets themselves are not asserted: timings are too noisy on shared CI machines.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "save_load.py"
KEYS = ("save_vs_dd", "save_vs_torch_save", "restore_vs_torch_load", "dedup_vs_min")


@pytest.mark.skipif(shutil.which("dd") is None, reason="the benchmark's baseline needs dd")
def test_bench_save_load_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--size-mib", "8", "--runs", "1", "--json", "--dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    for key in KEYS:
        value = result[key]
        assert isinstance(value, float), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
