"""Indexing many repositories at once: worker processes, each indexing one repository at a time.

Reading and verifying manifests is CPU work in Python (JSON, blake3, validation), so one process indexes at the
speed of one core. :func:`index_many` starts ``workers`` processes (``python -m ckptkit.catalog.worker``), each with
its own connection to the same catalog, and hands each the next repository as it finishes the last. They meet
in the database as two ``ckptkit catalog sync`` processes would: a manifest is stored once (``INSERT ... ON
CONFLICT DO NOTHING``), SQLite serialises their write transactions, PostgreSQL runs them side by side.

Tasks and reports cross the pipes as JSON lines (nothing is pickled): the parent sends the catalog URL first
(on stdin, not in the command line, so a password never shows in ``ps``), then one task per line; the worker
answers each with :meth:`IndexReport.to_json`. A repository whose indexing fails is reported (``rejected``),
never fatal to the others; a worker that dies is replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

from ckptkit.catalog.indexer import IndexReport, index_repository
from ckptkit.errors import CkptkitError, InvalidArgumentError

__all__ = ["default_workers", "index_many", "index_one", "serve"]

MIN_REPOS_PER_WORKER = 4
"""Fewer repositories than this per worker are indexed in this process: starting a worker costs about 0.5 s."""


def default_workers(repos: int) -> int:
    """Worker processes for ``repos`` repositories: one per CPU this process may use (at most 8), fewer when
    there are not :data:`MIN_REPOS_PER_WORKER` repositories for each; 1 means in this process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8, repos // MIN_REPOS_PER_WORKER))


def index_one(engine: Any, url: str, storage_options: dict[str, Any] | None, hash_tensors: bool,
              full: bool) -> IndexReport:  # fmt: skip
    """Index one repository; a repository that cannot be read is a report with why, not an exception."""
    try:
        return index_repository(engine, url, storage_options, hash_tensors=hash_tensors, full=full)
    except (CkptkitError, OSError) as err:
        return IndexReport(url, rejected=[(url, f"cannot read the repository: {err}")])


def index_many(catalog_url: str, engine: Any, urls: Sequence[str], storage_options: dict[str, Any] | None, *,
               hash_tensors: bool, full: bool, workers: int | None) -> list[IndexReport]:  # fmt: skip
    """Index ``urls`` with ``workers`` processes (``None``: :func:`default_workers`); reports in ``urls``' order.

    Raises:
        InvalidArgumentError: ``workers`` below 1, or ``storage_options`` that are not JSON (they cross a pipe to
            the workers; pass ``workers=1`` to index in this process with any options).
    """
    n = default_workers(len(urls)) if workers is None else workers
    if n < 1:
        raise InvalidArgumentError(f"workers={workers}: give 1 or more (1 indexes in this process)")
    n = min(n, len(urls))
    if n <= 1:
        return [index_one(engine, u, storage_options, hash_tensors, full) for u in urls]
    try:
        opts = json.dumps(storage_options)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"storage_options must be JSON to reach worker processes ({err}); pass "
                                   "workers=1 to index in this process") from err  # fmt: skip
    tasks: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
    for i, u in enumerate(urls):
        tasks.put((i, u))
    for _ in range(n):
        tasks.put(None)
    out: list[IndexReport | None] = [None] * len(urls)
    errors: list[BaseException] = []

    def run() -> None:
        worker: _Worker | None = None
        try:
            while (task := tasks.get()) is not None:
                i, url = task
                if worker is None:
                    worker = _Worker(catalog_url)
                line = json.dumps({"repo": url, "storage_options": json.loads(opts), "hash_tensors": hash_tensors,
                                   "full": full})  # fmt: skip
                reply = worker.ask(line)
                if reply is None:  # it died: report this repository, go on with a new worker
                    out[i] = IndexReport(url, rejected=[(url, f"the indexing worker process ended ({worker.end()}) "
                                                              "while indexing it; index it again")])  # fmt: skip
                    worker = None
                else:
                    out[i] = _report(reply, url)
        except BaseException as err:
            errors.append(err)
        finally:
            if worker is not None:
                worker.end()

    threads = [threading.Thread(target=run, name=f"ckptkit-index-{k}", daemon=True) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return [r if r is not None else IndexReport(u, rejected=[(u, "not indexed: a worker failed")])
            for r, u in zip(out, urls, strict=True)]  # fmt: skip


def _report(reply: dict[str, Any], url: str) -> IndexReport:
    if "error" in reply:
        return IndexReport(url, rejected=[(url, str(reply["error"]))])
    return IndexReport(str(reply["repo"]), indexed=[str(x) for x in reply["indexed"]], read=int(reply["read"]),
                       rejected=[(str(r["where"]), str(r["why"])) for r in reply["rejected"]],
                       objects_hashed=int(reply["objects_hashed"]),
                       status={str(k): int(v) for k, v in reply["status"].items()})  # fmt: skip


class _Worker:
    """One ``python -m ckptkit.catalog.worker`` process and its pipes."""

    def __init__(self, catalog_url: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ckptkit.catalog.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1)  # fmt: skip
        self.stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        self._send(catalog_url)

    def _send(self, line: str) -> bool:
        try:
            self.stdin.write(line + "\n")
            self.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def ask(self, line: str) -> dict[str, Any] | None:
        if not self._send(line):
            return None
        reply = self.stdout.readline()
        if not reply:
            return None
        data = json.loads(reply)
        return data if isinstance(data, dict) else None

    def end(self) -> str:
        """Close its stdin (it exits), wait for it; how it ended."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stdout.close()
        return f"exit code {code}"


def serve() -> None:
    """The worker's loop (``python -m ckptkit.catalog.worker``): the catalog URL, then a task per line until stdin
    closes. Replies go to the stdout it was started with; anything else printed goes to stderr."""
    from ckptkit.catalog.database import open_engine

    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    catalog_url = sys.stdin.readline().rstrip("\n")
    engine = open_engine(catalog_url)
    try:
        for line in sys.stdin:
            task = json.loads(line)
            try:
                r = index_one(engine, task["repo"], task["storage_options"], task["hash_tensors"], task["full"])
                reply: dict[str, Any] = r.to_json()
            except Exception as err:
                reply = {"error": f"indexing failed in a worker: {type(err).__name__}: {err}"}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    finally:
        engine.dispose()
