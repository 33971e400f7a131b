"""The fork server of the SIGKILL crash tests (tests/test_crash.py, tests/test_s3.py): both of its ends.

Importing torch takes seconds, forking takes milliseconds, and a crash test runs many trials. So the worker script
imports everything once and calls :func:`serve`, which reads commands on stdin:

    "go"    start a saver process and print "child <pid> fork|spawn": forked, or a fresh interpreter (``spawn_argv``)
            when this process is not single-threaded (forking a multi-threaded process is unsafe; the test sets
            OPENBLAS_NUM_THREADS=1, since numpy's OpenBLAS otherwise starts a thread pool at import). The saver
            prints "ready <step>" when it is about to save its first checkpoint and "committed <step>" after each
            commit; a forked saver that raises prints "error <type>: <message>".
    "reap"  wait for the saver (which the test has killed) and print "reaped <pid> <returncode>" (as subprocess
            reports it: -9 for SIGKILL).
    EOF     exit.

Every line is printed and flushed on its own (atomic on the shared pipe). The test drives the server through
:class:`ForkServer`. This file imports nothing heavy at the top: the worker and the test both import it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0  # unknown: do not fork


def serve(url: str, saver: Callable[[str], object], spawn_argv: list[str]) -> None:
    """Run the server loop: fork ``saver(url)`` per "go" (or run ``spawn_argv`` when forking is unsafe), wait for it
    per "reap". Whatever the saver needs should be imported before this is called."""
    import torch

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer costs ~1 s of lazy imports
    print("loaded", flush=True)
    child: int | subprocess.Popen[bytes] | None = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go":
            if _threads() == 1:  # forking a multi-threaded process is unsafe: then start a fresh one
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        saver(url)
                    except BaseException as err:
                        print(f"error {type(err).__name__}: {err}", flush=True)
                        code = 1
                    finally:
                        os._exit(code)
                child = pid
            else:
                child = subprocess.Popen(spawn_argv)
                pid = child.pid
            print(f"child {pid} {'fork' if isinstance(child, int) else 'spawn'}", flush=True)
        elif cmd == "reap" and child is not None:
            if isinstance(child, int):
                pid, status = os.waitpid(child, 0)
                code = os.waitstatus_to_exitcode(status)
            else:
                pid, code = child.pid, child.wait()
            print(f"reaped {pid} {code}", flush=True)
            child = None


class ForkServer:
    """The test's end: the worker (``argv``, run with ``env``, default this process's, plus OPENBLAS_NUM_THREADS=1)
    as a fork server in a subprocess, its stderr in ``log``. Each trial calls :meth:`start`, then :meth:`kill`;
    :attr:`modes` collects how each saver was started ("fork" or "spawn")."""

    def __init__(self, argv: list[str], env: Mapping[str, str] | None, log: Path) -> None:
        self.log = log
        self.child: int | None = None
        self.modes: list[str] = []
        self.stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
            env={**(os.environ if env is None else env), "OPENBLAS_NUM_THREADS": "1"},
        )  # fmt: skip
        self._until("loaded")

    def _fail(self, why: str) -> None:
        import pytest

        self.close()
        pytest.fail(f"{why}; worker stderr:\n{self.log.read_text()[-3000:]}")

    def _send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def _until(self, *prefixes: str) -> list[str]:
        """Read lines until one starting with each prefix was seen; return all lines read."""
        assert self.proc.stdout is not None
        lines: list[str] = []
        wanted = set(prefixes)
        while wanted:
            line = self.proc.stdout.readline()
            if not line:
                self._fail(f"worker ended; it said {lines}")
            if line.startswith("error "):
                self._fail(f"saver failed: {line.strip()}")
            lines.append(line.strip())
            wanted -= {p for p in wanted if line.startswith(p)}
        return lines

    def start(self) -> tuple[int, int, list[str]]:
        """Start a saver and wait until it is about to save: (pid, first step, lines read)."""
        self._send("go")
        lines = self._until("child ", "ready ")
        child = next(x.split() for x in lines if x.startswith("child "))
        pid = self.child = int(child[1])
        self.modes.append(child[2])
        step = next(int(x.split()[1]) for x in lines if x.startswith("ready "))
        return pid, step, lines

    def wait_committed(self, lines: list[str]) -> list[str]:
        """Block until the running saver reports its next commit; ``lines`` plus the lines read (pass them on to
        :meth:`kill`). For trials that must land after a commit, whatever the machine's speed."""
        return lines + self._until("committed ")

    def kill(self, pid: int, lines: list[str]) -> list[int]:
        """SIGKILL the saver and wait until it is gone; the steps it reported committed."""
        os.kill(pid, signal.SIGKILL)
        self._send("reap")
        lines = lines + self._until("reaped ")
        reaped = lines[-1].split()
        assert int(reaped[1]) == pid
        self.child = None
        assert int(reaped[2]) == -signal.SIGKILL, f"the saver exited on its own before the kill: {lines}"
        return [int(x.split()[1]) for x in lines if x.startswith("committed ")]

    def close(self) -> None:
        if self.child is not None:  # a failure mid-trial: do not leave a saver running
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
            self.child = None
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
