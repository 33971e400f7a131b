"""The ckptkit command line, in-process (click's runner) and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.cli import main
from ckptkit.schema import Progress


def _repo(tmp_path: Path) -> str:
    url = str(tmp_path / "repo")
    model = torch.nn.Linear(4, 4)
    for step in (10, 20):
        with torch.no_grad():
            model.weight.add_(1)
        ckptkit.save(url, {"model": model}, f"step-{step}", progress=Progress(global_step=step, epoch=1),
                     metrics={"loss": 1 / step}, hparams={"lr": 0.1})  # fmt: skip
    return url


def test_ls_show_verify_gc(tmp_path: Path) -> None:
    url = _repo(tmp_path)
    runner = CliRunner()
    out = runner.invoke(main, ["ls", url, "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["name"] for r in rows] == ["step-10", "step-20"] and rows[1]["step"] == 20
    out = runner.invoke(main, ["ls", url])
    assert out.exit_code == 0 and "2 checkpoint(s)" in out.output
    out = runner.invoke(main, ["show", url, "step-10"])
    assert out.exit_code == 0 and "epoch 1, step 10" in out.output and "model" in out.output
    out = runner.invoke(main, ["show", url, "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["name"] == "step-20"
    out = runner.invoke(main, ["verify", url])
    assert out.exit_code == 0 and out.output.count("ok ") == 2
    out = runner.invoke(main, ["gc", url])
    assert out.exit_code == 0 and "removed 0 object(s)" in out.output


def test_subprocess_verify_exits_nonzero_naming_the_object(tmp_path: Path) -> None:
    url = _repo(tmp_path)
    obj = next(p for p in (Path(url) / "objects").rglob("*") if p.is_file())
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "ckptkit.cli", "verify", url], capture_output=True, text=True)
    assert proc.returncode == 1
    assert obj.name in proc.stdout and "CORRUPT" in proc.stdout


def test_missing_checkpoint_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    url = _repo(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ckptkit.cli", "show", url, "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no checkpoint named 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_kills_resumes_and_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ckptkit.cli", "demo", "--url", str(tmp_path), "--steps", "40"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "killed (exit -9)" in proc.stdout
    assert "worker: resumed from step-" in proc.stdout
    assert "bit-exact: yes" in proc.stdout
    assert "(exact)" in proc.stdout and "lineage: continue from step-00000040" in proc.stdout
    assert "3.weight   reinit_shape  [1, 64] -> [3, 64]" in proc.stdout and "lineage transfer from" in proc.stdout
    lineage = proc.stdout.split("8. lineage")[1]
    assert "[transfer]" in lineage and "[continue]" in lineage and "[resume]" in lineage
    # the demo records its dataset: the classifier's audit lists it with the samples the run consumed
    cls_url = proc.stdout.split("ckptkit audit ")[1].split()[0]
    audit = subprocess.run([sys.executable, "-m", "ckptkit.cli", "audit", cls_url], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert audit.returncode == 0 and "noisy-regression: " in audit.stdout, audit.stdout + audit.stderr


def test_export_command_writes_the_framework_files(tmp_path: Path) -> None:
    url = _repo(tmp_path)
    out = CliRunner().invoke(main, ["export", url, str(tmp_path / "exported"), "step-10"])
    assert out.exit_code == 0, out.output
    assert "model.safetensors" in out.output and (tmp_path / "exported" / "ckptkit.json").exists()
