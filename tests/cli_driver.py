"""Run several ``ckptkit`` command lines through the CLI's entry point (``ckptkit.cli.run``, which turns every
error into one ``error:`` line and an exit code) in ONE fresh interpreter: one start for all of them, which CI's
time budget needs, and each line still sees exactly what a shell user sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_DRIVER = """
import contextlib, io, json, sys
from ckptkit.cli import run
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["ckptkit", *argv]
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run()
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def run_cli(argvs: list[list[str]], env: dict[str, str] | None = None, cwd: str | Path | None = None,
            timeout: float = 300) -> list[dict[str, Any]]:  # fmt: skip
    """Each command line's ``{"rc", "out", "err"}``, in order."""
    out = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return results
