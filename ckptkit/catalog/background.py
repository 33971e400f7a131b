"""Handing committed manifests to a slow or unreliable service in the background: the machinery that
:class:`~ckptkit.catalog.publish.CommitIndexer` (the catalog) and
:class:`~ckptkit.catalog.mlflow.MlflowCommitPublisher` (an MLflow server) share, so that neither can fail or slow
a save.

``submit`` only appends to a bounded queue; one daemon thread delivers what is queued, in order. When the service
cannot be reached, the entry stays queued and the thread retries with a growing wait (0.25 s, doubling, at most
30 s), logging one warning per outage and one when the service is back. What is not delivered in the end (the
queue overflowed, ``close`` gave up, the process was killed) is still in the repository; each subclass's log
messages name the command that delivers it later.

This module imports neither SQLAlchemy nor MLflow: a subclass brings what its service needs.
"""

from __future__ import annotations

import abc
import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable

from ckptkit.errors import InvalidArgumentError
from ckptkit.schema import Manifest
from ckptkit.storage import Repository

__all__ = ["CommitQueue"]

log = logging.getLogger("ckptkit")

_FIRST_WAIT = 0.25
_MAX_WAIT = 30.0
_LIVE: weakref.WeakSet[CommitQueue] = weakref.WeakSet()


class CommitQueue(abc.ABC):
    """A bounded queue of manifests committed to one repository, delivered to a service by a daemon thread.

    Subclasses implement :meth:`_deliver` (and :meth:`_dispose` when they hold connections) and say, for the log
    messages, what the service is (:meth:`_target`), what delivering means (``NOUN``, ``DONE``, ``DOING``) and
    which command delivers what was left behind (:meth:`_remedy`).

    Args:
        repo: the repository the manifests are committed to.
        max_queue: manifests kept while the service is unreachable; beyond it the oldest are dropped.
        thread_name: the name of the daemon thread.

    Attributes ``delivered``, ``rejected`` (manifests the service refused, logged) and ``dropped`` count what
    happened to the submitted manifests.

    Raises:
        InvalidArgumentError: ``max_queue`` is not a positive integer.
    """

    NOUN = "queue"
    """What the queue is called in the log (``indexer``, ``publisher``)."""
    DONE = "delivered"
    """What happened to a delivered manifest, as a participle (``indexed``, ``published``)."""
    DOING = "delivering"
    """What the thread is doing (``indexing``, ``publishing``)."""
    SERVICE = "service"
    """The kind of service, for the overflow message (``catalog``, ``MLflow server``)."""

    def __init__(self, repo: Repository, *, max_queue: int = 1000, thread_name: str = "ckptkit-queue") -> None:
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise InvalidArgumentError(f"max_queue={max_queue!r}: must be a positive integer (manifests kept while "
                                       f"the {self.SERVICE} is unreachable)")  # fmt: skip
        self.repo = repo
        self.max_queue = max_queue
        self.delivered = 0
        self.rejected = 0
        self.dropped = 0
        self._thread_name = thread_name
        self._queue: deque[tuple[Manifest, tuple[str, ...]]] = deque()
        self._cond = threading.Condition()
        self._busy = False  # the head of the queue is being delivered
        self._closing = False
        self._down: str | None = None  # why the service is unreachable, during an outage
        self._overflowing = False
        self._thread: threading.Thread | None = None

    # --- what a subclass says --------------------------------------------------------------------------

    @abc.abstractmethod
    def _target(self) -> str:
        """The service, as log messages name it (``catalog sqlite:///...``)."""

    @abc.abstractmethod
    def _remedy(self) -> str:
        """The command that delivers what was left behind, as a subject: ``'`ckptkit catalog add R` indexes'``."""

    @abc.abstractmethod
    def _deliver(self, manifest: Manifest, retired: tuple[str, ...]) -> str | None:
        """Deliver one manifest: None when done (count it with :meth:`_done`) or refused (:meth:`_refused`), else
        why the service cannot be reached (the entry stays queued and is tried again). Runs in the thread."""

    def _dispose(self) -> None:  # noqa: B027 - a hook: most services hold nothing to release
        """Release connections once the thread is done."""

    # --- the queue -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Manifests submitted and not yet delivered (or given up)."""
        with self._cond:
            return len(self._queue)

    def submit(self, manifest: Manifest, retired: Iterable[str] = ()) -> None:
        """Queue a manifest just committed to the repository (and the names its save pruned) and return at once.

        Never raises for the service's sake: a full queue drops its oldest entry (logged once per overflow), and a
        manifest submitted after :meth:`close` is left behind (logged).
        """
        with self._cond:
            if self._closing:
                self.dropped += 1
                log.warning("%s: %s was committed after the %s closed and is not %s; %s it", self._target(),
                            manifest.name, self.NOUN, self.DONE, self._remedy())  # fmt: skip
                return
            if len(self._queue) >= self.max_queue:
                head_busy = self._busy
                victim = self._queue[1] if head_busy and len(self._queue) > 1 else self._queue[0]
                self._queue.remove(victim)
                self.dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                    log.warning("%s: more than %d checkpoints of %s wait to be %s (%s); dropping the oldest, %s them",
                                self._target(), self.max_queue, self.repo.url, self.DONE,
                                self._down or f"the {self.SERVICE} is slow", self._remedy())  # fmt: skip
            self._queue.append((manifest, tuple(retired)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
                self._thread.start()
                _LIVE.add(self)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted manifest is delivered (True), or ``timeout`` seconds pass, or the service is
        found unreachable (False): never waits on an outage."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue and self._down is None and self._thread is not None and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return not self._queue

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, trying an unreachable service once more, for at most ``timeout`` seconds; then
        drop the rest (logged with its count and the command that delivers it) and stop the thread. Safe to call
        twice."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
            self.dropped += left
        if left:
            log.warning("%s: %d checkpoint(s) of %s not %s (%s); %s them", self._target(), left, self.repo.url,
                        self.DONE, self._down or f"not done within {timeout:g} s", self._remedy())  # fmt: skip
        _LIVE.discard(self)
        if thread is None or not thread.is_alive():
            self._dispose()

    # --- for subclasses --------------------------------------------------------------------------------

    def _done(self) -> None:
        with self._cond:
            self.delivered += 1

    def _refused(self, manifest: Manifest, why: str) -> None:
        with self._cond:
            self.rejected += 1
        log.warning("%s: %s of %s not %s: %s", self._target(), manifest.name, self.repo.url, self.DONE, why)

    def _failed(self, manifest: Manifest, err: Exception) -> None:
        """A bug, not the service: logged with its trace (it must not stop the thread, nor ever reach the save)."""
        log.exception("%s: %s %s of %s failed", self._target(), self.DOING, manifest.name, self.repo.url)
        self._refused(manifest, f"{type(err).__name__}: {err}")

    # --- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        wait = 0.0
        while True:
            with self._cond:
                if wait:
                    self._cond.wait_for(lambda: self._closing, wait)  # close() cuts a wait short
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                entry = self._queue[0]
                self._busy = True
            problem = self._deliver(*entry)
            with self._cond:
                self._busy = False
                if problem is None:
                    if self._queue and self._queue[0] is entry:
                        self._queue.popleft()
                    if self._down is not None:
                        log.warning("%s is reachable again; %s the checkpoints of %s that waited", self._target(),
                                    self.DOING, self.repo.url)  # fmt: skip
                    self._down = None
                    self._overflowing = len(self._queue) >= self.max_queue
                    wait = 0.0
                else:
                    if self._down is None:
                        log.warning("%s unreachable (%s): saves go on; %d checkpoint(s) of %s wait to be %s, "
                                    "retrying", self._target(), problem, len(self._queue), self.repo.url,
                                    self.DONE)  # fmt: skip
                    self._down = problem
                    wait = min(max(wait * 2, _FIRST_WAIT), _MAX_WAIT)
                    if self._closing:
                        self._cond.notify_all()
                        break
                self._cond.notify_all()
        self._dispose()


@atexit.register
def _flush_at_exit() -> None:
    """At interpreter exit, give each queue a moment to deliver what it holds (none on an outage)."""
    deadline = time.monotonic() + 5.0
    for q in list(_LIVE):
        q.flush(max(0.0, deadline - time.monotonic()))
