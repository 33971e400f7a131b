"""The async writer: one background thread that commits snapshots in order, at a lower CPU priority, and an
exit hook that waits for the save in flight (a checkpoint is never left behind at interpreter exit)."""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from ckptkit.hashing import single_threaded_hashing

__all__ = ["Closable", "Writer", "track"]

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


@atexit.register
def _finish_pending_saves() -> None:
    """At interpreter exit, commit what async saves are still writing (never leave the last one behind)."""
    for owner in list(_LIVE):
        if owner.pending():
            log.warning("waiting for the checkpoint being written to %s before exiting", owner.describe())
        try:
            owner.close()
        except Exception as err:
            log.error("async save to %s failed at exit: %s", owner.describe(), err)
