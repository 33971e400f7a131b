"""The async writer: one background thread that commits snapshots in order, at a lower CPU priority, and an
exit hook that waits for the save in flight (a checkpoint is never left behind at interpreter exit).

With ``writer="process"`` the hashing and writing happen in a child process instead (:class:`ProcessWriter`):
it maps the snapshot's shared-memory arena, runs the same commit (pending record, objects, fsync, manifest last)
on its own copy of the repository and answers with the committed manifest. The background thread then only
waits on a socket, so the training loop never waits for the GIL of a low-priority writer thread that the
scheduler has set aside (what made async saves slow on a busy machine), and the priority applies to the whole
process, its fsync thread included. Messages are JSON; tensors never travel, only their offsets in the arena.
"""

from __future__ import annotations

import atexit
import builtins
import concurrent.futures
import concurrent.futures.thread  # its exit hook first, so that ours (below) runs before it
import contextlib
import functools
import importlib
import json
import logging
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ckptkit.errors import StorageError
from ckptkit.hashing import single_threaded_hashing
from ckptkit.storage.backend import in_background

__all__ = [
    "Closable",
    "ProcessWriter",
    "Writer",
    "lower_process_priority",
    "recv_message",
    "send_message",
    "track",
]

log = logging.getLogger("ckptkit")


class Writer:
    """One background thread that runs save jobs in order. A daemon thread, so that interpreter exit reaches
    the atexit hook below, which waits for the pending commit and says so."""

    def __init__(self, nice: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Any] | None] = queue.SimpleQueue()
        self._nice = nice
        self._thread = threading.Thread(target=self._run, name="ckptkit-save", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._nice:
            lower_thread_priority(self._nice)
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if future.set_running_or_notify_cancel():
                try:
                    with in_background():  # no one waits on this save's wall time: a backend may trade it for CPU
                        future.set_result(fn())
                except BaseException as err:
                    future.set_exception(err)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((future, functools.partial(fn, *args)))
        return future

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: per thread, inherited by the threads it starts,
    such as the fsync thread) and keep its hashing on itself. Elsewhere a no-op: the writer runs at normal
    priority."""
    single_threaded_hashing()
    setpriority, getpriority = getattr(os, "setpriority", None), getattr(os, "getpriority", None)
    if setpriority is None or getpriority is None or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        setpriority(os.PRIO_PROCESS, tid, min(19, getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as err:  # e.g. a seccomp policy: the save still works, only at normal priority
        log.debug("could not lower the async writer's priority: %s", err)


def lower_process_priority(nice: int) -> None:
    """Lower the calling process's CPU priority by ``nice`` (every thread it starts from now on inherits it)."""
    single_threaded_hashing()
    if not nice or not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except OSError as err:  # pragma: no cover - a seccomp policy: the save still works, at normal priority
        log.debug("could not lower the writer process's priority: %s", err)


# --- writer process ---------------------------------------------------------------------------------------


def send_message(sock: socket.socket, message: Mapping[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("<Q", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if not got:
            return None
        view = view[got:]
    return bytes(buf)


def recv_message(sock: socket.socket) -> Any:
    """The next message, or None when the other side closed the socket."""
    head = _recv_exact(sock, 8)
    if head is None:
        return None
    body = _recv_exact(sock, struct.unpack("<Q", head)[0])
    return None if body is None else json.loads(body)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class ProcessWriter(Writer):
    """Commits in a child process (``python -m ckptkit.manager.writer_process``) on a local repository: the background
    thread of :class:`Writer` (at normal priority: it only waits, then applies retention) sends each save to the
    child, which runs at ``nice`` below training. A child that dies fails the save it had (raised by the next
    ``save``/``wait``, like any background error); the next save starts a new one."""

    def __init__(self, nice: int, url: str, snapshots: Any) -> None:
        super().__init__(0)
        self._child_nice = nice
        self._url = url
        self._snapshots = snapshots  # a shared Snapshotter: its arena is what the child maps
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._sent: int | None = None  # the arena generation the child has

    @property
    def pid(self) -> int | None:
        """The writer process's id (None before the first save and after a failure)."""
        return None if self._proc is None else self._proc.pid

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ckptkit.manager.writer_process", str(theirs.fileno()), str(self._child_nice)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock, self._sent = ours, None
        return ours

    def _drop(self) -> None:
        """Forget a child that failed (it is killed if still running)."""
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        self._proc = self._sock = None

    def commit(self, repo: Any, captured: list[Any], name: str, **fields: Any) -> Any:
        """:func:`~ckptkit.engine.commit.commit_captured` of ``captured`` (tensors in the snapshot's arena) into
        ``repo``, by the writer process; the committed manifest."""
        from ckptkit.schema import parse_manifest

        arena = self._snapshots.arena
        base = arena.base.data_ptr()
        components = [
            {"name": c.name, "kind": c.kind, "type": c.type, "json": c.json, "classes": c.classes,
             "aliases": c.aliases, "adapter": c.adapter, "meta": c.meta,
             "tensors": {k: [t.data_ptr() - base if t.numel() else 0, _dtype_name(t.dtype), list(t.shape)]
                         for k, t in c.tensors.items()}}
            for c in captured
        ]  # fmt: skip
        message = {"op": "commit", "url": self._url, "direct_io": getattr(repo.backend, "direct_io", None),
                   "name": name, "components": components,
                   "object_size": fields.pop("object_size"), "metrics": dict(fields.pop("metrics") or {}),
                   "hparams": dict(fields.pop("hparams") or {}),
                   **{k: None if v is None else (
                       [x.model_dump(mode="json") for x in v] if isinstance(v, list) else v.model_dump(mode="json"))
                      for k, v in fields.items()}}  # fmt: skip
        sock = self._sock if self._proc is not None and self._proc.poll() is None else None
        try:
            if sock is None:
                self._drop()
                sock = self._start()
            if self._sent != arena.generation:
                send_message(sock, {"op": "arena", "size": arena.size})
                socket.send_fds(sock, [b"A"], [arena.fd])
                self._sent = arena.generation
            send_message(sock, message)
            reply = recv_message(sock)
        except OSError as err:
            reply, why = None, f"{err}"
        else:
            why = ""
        if reply is None:
            rc = self._proc.wait() if self._proc is not None else None
            self._drop()
            raise StorageError(repo.url, f"committing checkpoint {name!r}", None,
                               f"the writer process exited (status {rc}){': ' + why if why else ''}",
                               "the checkpoint was not committed; the next save starts a new writer "
                               "process")  # fmt: skip
        if not reply["ok"]:
            raise _rebuild(reply)
        return parse_manifest(reply["manifest"].encode(), f"{repo.url}/checkpoints/{name}.json")

    def stop(self) -> None:
        super().stop()
        if self._sock is not None:
            self._sock.close()  # the child sees the end of its input and exits
        if self._proc is not None:
            self._proc.wait()
        self._proc = self._sock = None


def _rebuild(reply: Mapping[str, Any]) -> BaseException:
    """The exception the writer process raised, as one of its own type where that can be rebuilt (with the
    child's traceback as its cause); otherwise a RuntimeError that says what it was."""
    module, _, qualname = reply["type"].rpartition(".")
    cls: Any = None
    try:
        owner: Any = builtins if module == "builtins" else importlib.import_module(module)
        cls = getattr(owner, qualname)
    except (ImportError, AttributeError):
        cls = None
    err: BaseException
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            err = cls(*reply["args"])
        except Exception:
            err = cls.__new__(cls)
            Exception.__init__(err, *reply["args"])
        for k, v in reply["attrs"].items():
            with contextlib.suppress(AttributeError):  # a read-only attribute
                setattr(err, k, v)
    else:
        err = RuntimeError(f"{reply['type']}: {reply['message']}")
    err.__cause__ = RuntimeError(f"raised in the writer process:\n{reply['traceback']}")
    return err


class Closable(Protocol):
    """What the exit hook needs of a manager: whether a save is in flight, where, and a way to finish it."""

    def pending(self) -> bool: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def track(owner: Closable, live: bool = True) -> None:
    """Have the exit hook finish ``owner``'s pending save (``live=False`` forgets it)."""
    if live:
        _LIVE.add(owner)
    else:
        _LIVE.discard(owner)


def _finish_pending_saves() -> None:
    """At interpreter exit, commit what async saves are still writing (never leave the last one behind).

    Registered with :mod:`threading`'s exit hooks where it has them (CPython 3.9+), which run before
    :mod:`concurrent.futures` shuts its executors (registered earlier, at its import: they run in reverse): a
    commit still needs them then (asyncio resolves a new connection's host name on its default executor, the
    codec encodes on a thread pool). A plain atexit hook ran after that, and a save still uploading to S3 at exit
    failed with "cannot schedule new futures after interpreter shutdown". The atexit hook stays as a fallback: by
    then it finds nothing left to do."""
    for owner in list(_LIVE):
        if owner.pending():
            log.warning("waiting for the checkpoint being written to %s before exiting", owner.describe())
        try:
            owner.close()
        except Exception as err:
            log.error("async save to %s failed at exit: %s", owner.describe(), err)


atexit.register(_finish_pending_saves)
_register_early = getattr(threading, "_register_atexit", None)
if _register_early is not None:
    _register_early(_finish_pending_saves)
