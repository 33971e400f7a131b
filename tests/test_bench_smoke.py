"""Smoke tests of the benchmarks in bench/: each runs end to end on a tiny state and reports finite ratios (positive
where they cannot be anything else) for every target it names, and leaves no file behind.

The targets themselves are not asserted: timings are too noisy on shared CI machines (docs/benchmarks.md has the
figures measured with the full-size runs).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import _in_ci, load_s3server

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, args: list[str], tmp_path: Path, timeout: float = 300) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / script), *args, "--runs", "1", "--json", "--dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.stdout)
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
    return result


def assert_ratios(result: dict[str, Any], keys: tuple[str, ...], signed: tuple[str, ...] = ()) -> None:
    """Every ``keys`` figure finite and positive; those in ``signed`` (an estimate that is a difference, such as
    training time lost, below zero by the noise when the true value is near zero) finite."""
    for key in keys:
        value = result[key]
        assert isinstance(value, float), (key, value)
        assert math.isfinite(value) and (value > 0 or key in signed), (key, value)
    targets = set(result.get("targets", {}))
    assert targets <= set(keys), f"a target without a smoke check: {targets - set(keys)}"
    assert set(result.get("pass", {})) == targets


@pytest.mark.skipif(shutil.which("dd") is None, reason="the benchmark's baseline needs dd")
def test_bench_save_load_smoke(tmp_path: Path) -> None:
    result = run_bench("save_load.py", ["--size-mib", "8"], tmp_path)
    assert_ratios(result, ("save_vs_dd", "save_vs_torch_save", "restore_vs_torch_load", "dedup_vs_min"))


def test_bench_async_save_smoke(tmp_path: Path) -> None:
    result = run_bench("async_save.py", ["--size-mib", "8", "--steps", "3"], tmp_path)
    assert_ratios(result, ("async_block_vs_copy", "async_block_vs_sync", "step_slowdown_during_save",
                           "step_slowdown_during_save_threads1", "async_lost_vs_sync",
                           "async_lost_vs_sync_loaded"), signed=("async_lost_vs_sync", "async_lost_vs_sync_loaded"))  # fmt: skip
    assert result["windows"]["default"]["saves"] == 1 and result["windows"]["default"]["steps_during"][0] >= 1


def test_bench_s3_smoke(tmp_path: Path) -> None:
    missing = load_s3server().missing_binaries()
    if missing:
        why = f"bench/s3.py needs a local Ceph S3 server (missing {', '.join(missing)})"
        if _in_ci():  # CI installs Ceph: a missing server there is a broken setup, not a reason to skip
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    result = run_bench("s3.py", ["--size-mib", "8"], tmp_path, timeout=400)
    assert_ratios(result, ("s3_save_vs_boto3", "s3_restore_vs_boto3"))
    assert result["methods"]["ckptkit"]["bytes"] == result["methods"]["boto3"]["bytes"] > 8 * 2**20


def test_bench_cli_smoke(tmp_path: Path) -> None:
    result = run_bench("cli.py", ["--checkpoints", "5", "--warmup", "0"], tmp_path)
    assert_ratios(result, ("cli_ls_s", "cli_log_s"))
    assert result["checkpoints"] == 5 and result["python_s"] > 0 and result["import_torch_s"] > 0
