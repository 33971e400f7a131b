"""Every error ckptkit raises.

All derive from :class:`CkptkitError`; each also derives from the builtin exception that callers already
catch for the same situation (a missing checkpoint is a ``FileNotFoundError``, a bad argument a ``ValueError``),
so ``except FileNotFoundError`` keeps working around ckptkit calls.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AdapterError",
    "ArgumentTypeError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CkptkitError",
    "CorruptObjectError",
    "DestinationNotEmptyError",
    "DistributedCheckpointError",
    "FormatVersionError",
    "ImportFormatError",
    "IncompleteCheckpointError",
    "InvalidArgumentError",
    "InvalidNameError",
    "ManagerClosedError",
    "ManifestError",
    "MissingDependencyError",
    "NoRestorableCheckpointError",
    "OptimizerMappingError",
    "RepositoryBusyError",
    "SourceFormatError",
    "SourceNotFoundError",
    "StateMismatchError",
    "StorageError",
    "StorageFullError",
    "StorageTimeoutError",
    "UnsupportedStateError",
    "VerificationError",
]


class CkptkitError(Exception):
    """Root of every error raised by ckptkit."""


class CheckpointNotFoundError(CkptkitError, FileNotFoundError):
    """A named checkpoint (or any checkpoint at all) does not exist in the repository."""

    def __init__(self, url: str, name: str | None, available: list[str] | None = None) -> None:
        self.url = url
        self.name = name
        self.available = available or []
        msg = f"no committed checkpoint in {url}" if name is None else f"no checkpoint named {name!r} in {url}"
        if self.available:
            shown = ", ".join(self.available[-5:])
            more = f" (and {len(self.available) - 5} more)" if len(self.available) > 5 else ""
            msg += f"; available: {shown}{more}"
        else:
            msg += "; run `ckptkit ls URL` to see what the repository holds"
        super().__init__(msg)


class CheckpointExistsError(CkptkitError, FileExistsError):
    """A checkpoint of that name is already committed; checkpoints are immutable."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        super().__init__(
            f"checkpoint {name!r} already exists in {url}; checkpoints are immutable: "
            "choose another name, or delete the old one first"
        )


class CorruptObjectError(CkptkitError, OSError):
    """An object's bytes do not hash to the name it is stored under (bit rot, truncation, tampering)."""

    def __init__(self, path: str, expected: str, found: str, detail: str = "") -> None:
        self.path = path
        self.expected = expected
        self.found = found
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"object {path} is corrupt{extra}: expected {expected}, found {found}; "
            "restore an older checkpoint (`ckptkit ls`), or copy the object back from a replica"
        )


class IncompleteCheckpointError(CkptkitError, OSError):
    """A manifest names objects that are missing from the repository."""

    def __init__(self, name: str, missing: list[str]) -> None:
        self.name = name
        self.missing = missing
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        super().__init__(
            f"checkpoint {name!r} is incomplete: {len(missing)} object(s) missing: {shown}; "
            "the objects were deleted outside ckptkit or never copied; restore an older checkpoint"
        )


class ManifestError(CkptkitError, ValueError):
    """A manifest cannot be parsed or fails validation (malformed, tampered, or not a ckptkit manifest)."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"invalid manifest {where}: {problem}")


class FormatVersionError(ManifestError):
    """A manifest was written by a newer ckptkit whose format this version cannot read."""

    def __init__(self, where: str, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        CkptkitError.__init__(
            self,
            f"manifest {where} has format_version {found}, but this ckptkit reads versions up to "
            f"{supported}; upgrade ckptkit (`pip install -U ckptkit`) to read it",
        )
        self.where = where
        self.problem = f"format_version {found} > {supported}"


class StorageError(CkptkitError, OSError):
    """A storage request failed for a reason other than a missing key: the connection was refused or cut, a
    response was cut short, the server answered with an error, or a local file could not be read.

    Attributes ``url`` (the repository), ``action`` (what was being done), ``key`` (the object it was done to,
    relative to the repository; None for the repository as a whole) and ``problem``; the library's own error is
    chained as ``__cause__``.
    """

    def __init__(self, url: str, action: str, key: str | None, problem: str, hint: str = "") -> None:
        self.url = url
        self.action = action
        self.key = key
        self.problem = problem
        target = f"{key} in {url}" if key else url
        fix = hint or "check the endpoint, the credentials and the network, then retry"
        super().__init__(f"{action} {target} failed: {problem}; {fix}")


class StorageTimeoutError(StorageError, TimeoutError):
    """A storage request did not complete within its deadline (see ``Repository(timeout=...)``); the operation
    was abandoned (a save's unfinished uploads aborted, its checkpoint not committed)."""

    def __init__(self, url: str, action: str, key: str | None, seconds: float, detail: str = "") -> None:
        self.seconds = seconds
        extra = f" ({detail})" if detail else ""
        super().__init__(url, action, key, f"no answer from the storage within {seconds:.3g}s{extra}",
                         "the endpoint is stalled or unreachable: check it and the network, then retry "
                         "(Repository(url, timeout=SECONDS) sets the deadline of each request)")  # fmt: skip


class StateMismatchError(CkptkitError, ValueError):
    """The saved state does not fit the object it is restored into (keys or shapes differ)."""

    def __init__(self, component: str, report: object, hint: str = "") -> None:
        self.component = component
        self.report = report
        fix = hint or "pass strict=False to load what fits and get this report back"
        super().__init__(f"state of {component!r} does not match: {report}; {fix}")


class UnsupportedStateError(CkptkitError, TypeError):
    """A value in the state cannot be stored without pickle."""

    def __init__(self, where: str, value_type: str, fix: str = "") -> None:
        self.where = where
        self.value_type = value_type
        super().__init__(
            f"cannot store {where}: values of type {value_type} are not serialisable without pickle; "
            + (fix or "convert it to tensors, numbers, strings, lists or dicts in state_dict()")
        )


class RepositoryBusyError(CkptkitError, RuntimeError):
    """Another process holds the repository's gc lock for longer than the caller waited."""


class InvalidArgumentError(CkptkitError, ValueError):
    """An argument's value is out of range or does not fit the others; the message says which and how to fix it."""


class InvalidNameError(InvalidArgumentError):
    """A checkpoint name, component name or hash that would become a storage path breaks the naming rule."""

    def __init__(self, what: str, value: object, rule: str = "") -> None:
        self.what = what
        self.value = value
        rule = rule or "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, not ending in .json"
        super().__init__(f"invalid {what} {value!r}: use {rule} (it becomes a storage path)")


class ArgumentTypeError(CkptkitError, TypeError):
    """An argument has the wrong type; the message names the argument, the type given and the type expected."""


class MissingDependencyError(CkptkitError, ImportError):
    """An optional package that this call needs is not installed; the message says what to install."""


class ManagerClosedError(CkptkitError, RuntimeError):
    """A :class:`~ckptkit.CheckpointManager` was used after :meth:`close`."""


class SourceNotFoundError(CkptkitError, FileNotFoundError):
    """A file or folder given as a source (weights, optimizer state, a foreign checkpoint) does not exist."""

    def __init__(self, path: str, what: str = "file or folder") -> None:
        self.path = path
        super().__init__(f"no such {what}: {path}; check the path (relative paths start from {_cwd()})")


class SourceFormatError(CkptkitError, ValueError):
    """A source file or folder exists but does not hold what it should (e.g. a weights file without tensors)."""


class ImportFormatError(SourceFormatError):
    """The source is not a layout :func:`~ckptkit.import_from` knows, or does not hold what its format promises."""


class OptimizerMappingError(CkptkitError, ValueError):
    """Saved optimizer state cannot be matched to parameter names with certainty; nothing is guessed."""


class AdapterError(CkptkitError, LookupError):
    """No model adapter fits, an adapter name is unknown, or a registered target is not a ModelAdapter."""


class DestinationNotEmptyError(CkptkitError, FileExistsError):
    """An export destination already holds files; nothing was written."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        super().__init__(f"export destination {dest} is not empty: choose a new folder (nothing was written)")


class StorageFullError(CkptkitError, OSError):
    """The storage has no room for a write: no space left on the device (``ENOSPC``) or over a disk quota
    (``EDQUOT``). ``errno`` is the system's; ``url`` is the repository and ``path`` the file that could not be
    written. Nothing partial is left: a save that hits it commits nothing (its complete objects are garbage for gc).
    """

    ERRNOS = frozenset(c for c in (_errno.ENOSPC, getattr(_errno, "EDQUOT", None)) if c is not None)
    """The ``errno`` values of a write that found no room."""

    def __init__(self, url: str, path: str, code: int | None = None, hint: str = "") -> None:
        self.url = url
        self.path = path
        code = _errno.ENOSPC if code is None else code
        what = "over its disk quota" if code == getattr(_errno, "EDQUOT", -1) else "no space left on the device"
        fix = hint or (f"free space: `ckptkit gc {url}` deletes what no checkpoint references, after pruning old "
                       "checkpoints (CheckpointManager.prune(), or `Repository.retire`) if gc finds nothing")
        super().__init__(f"cannot write {path} in repository {url}: {what} (errno {code}); nothing was committed; "
                         f"{fix}")
        self.errno = code  # set after: OSError's own formatting would hide the message


def _cwd() -> str:
    import os

    try:
        return os.getcwd()
    except OSError:  # the working directory was removed
        return "the working directory"


class NoRestorableCheckpointError(CkptkitError, OSError):
    """The repository holds checkpoints, and not one of them can be restored (each is damaged, incomplete or
    unreadable). Raised instead of starting afresh: ``skipped`` lists each checkpoint tried, with why."""

    def __init__(self, url: str, skipped: list[tuple[str, str]]) -> None:
        self.url = url
        self.skipped = list(skipped)
        shown = "; ".join(f"{n}: {why}" for n, why in self.skipped[:5])
        more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        super().__init__(
            f"{url} holds {len(self.skipped)} checkpoint(s) and none can be restored: {shown}{more}; run "
            f"`ckptkit verify {url}` for the damaged files, copy them back from a replica, or start a fresh run "
            "in another repository (nothing was loaded)"
        )


class VerificationError(CkptkitError, OSError):
    """:func:`ckptkit.verify` with ``raise_on_error=True`` found damaged checkpoints: a manifest edited after its
    commit, cut short or unreadable, or an object missing or corrupt. ``url`` is the repository; ``reports`` holds
    the :class:`~ckptkit.engine.verify.VerifyReport` of every checkpoint checked and ``damaged`` those not ok, each
    naming its damaged ``files`` and its ``problems``. The message names each damaged checkpoint and file."""

    FIX = ("a restore without a name falls back to the newest checkpoint that is intact; `ckptkit gc` repairs "
           "nothing (it only deletes objects no checkpoint references); to get a damaged checkpoint back, copy its "
           "damaged files back from a copy of the repository (a replica or a backup)")  # fmt: skip
    """How to recover, as the message says it (``ckptkit verify`` prints it too)."""

    def __init__(self, url: str, reports: Sequence[Any]) -> None:
        self.url = url
        self.reports = list(reports)
        self.damaged = [r for r in self.reports if not r.ok]
        parts = []
        for r in self.damaged:
            files = list(r.files)
            shown = ", ".join(files[:3]) + (f" (and {len(files) - 3} more)" if len(files) > 3 else "")
            parts.append(f"{r.name} ({shown or r.problems[0]})")
        super().__init__(
            f"{len(self.damaged)} of {len(self.reports)} checkpoint(s) in {url} failed verification: "
            f"{'; '.join(parts)} (each report in .reports lists its problems); {self.FIX}"
        )


class DistributedCheckpointError(CkptkitError, RuntimeError):
    """A sharded save or load (``ckptkit.distributed``) failed on one or more ranks for a reason that is not a
    ckptkit error of its own. ``action`` is ``"save"`` or ``"load"``, ``url`` the repository and ``failures`` maps
    each failed rank to its exception. A failed save commits nothing."""

    def __init__(self, url: str, action: str, failures: Mapping[int, BaseException], fix: str) -> None:
        self.url = url
        self.action = action
        self.failures = dict(failures)
        detail = "; ".join(f"rank {r}: {type(e).__name__}: {str(e)[:300]}" for r, e in sorted(self.failures.items()))
        super().__init__(f"distributed {action} in {url} failed on {len(self.failures)} rank(s): {detail}; {fix}")
