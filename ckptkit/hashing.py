"""One rule for hashes and names: blake3 hashing, and the validation of every hash and name that becomes a
storage path. Floor layer: imports neither torch nor numpy.

Example:
    >>> hash_bytes(b"ckptkit")[:16]
    'a88b5cd4ed711460'
    >>> check_name("step-00000010")
    'step-00000010'
"""

from __future__ import annotations

import re
import threading
from typing import Any

import blake3

from ckptkit.errors import InvalidNameError

__all__ = [
    "HASH_RE",
    "NAME_RE",
    "check_hash",
    "check_name",
    "file_hash",
    "hash_bytes",
    "hasher",
    "is_hash",
    "is_name",
    "single_threaded_hashing",
]

HASH_RE = r"^[0-9a-f]{64}$"
"""A blake3 hex digest: the name of an object and the id of a manifest."""
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Checkpoint and component names: they become storage paths, so no slashes, no leading dot."""

_HASH = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_HASHING = threading.local()  # .single: this thread hashes on itself only (see single_threaded_hashing)
MULTI_THREAD_HASH_FROM = 8 << 20
"""Bytes: smaller inputs are hashed on the calling thread."""


def is_hash(value: object) -> bool:
    """Whether ``value`` is a 64-character lowercase hex digest (a whole match: no trailing newline)."""
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid checkpoint or component name (a whole match: no trailing newline)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(name: object, what: str = "checkpoint name") -> str:
    """Validate a checkpoint (or component) name; it becomes a storage path.

    Raises:
        InvalidNameError: ``name`` is not 1-128 letters, digits, ``.``, ``_`` or ``-`` starting with a letter or
            digit, or it ends with ``.json``.
    """
    if not is_name(name) or str(name).endswith(".json"):
        raise InvalidNameError(what, name)
    return str(name)


def check_hash(value: object, what: str = "object hash") -> str:
    """Validate a blake3 hex digest that becomes a storage path.

    Raises:
        InvalidNameError: ``value`` is not 64 lowercase hex characters.
    """
    if not is_hash(value):
        raise InvalidNameError(what, value, "64 lowercase hex characters (a blake3 digest)")
    return str(value)


def hasher(nbytes: int) -> Any:
    """A blake3 hasher for ``nbytes`` of input: multi-threaded for large inputs, unless the calling thread
    asked for :func:`single_threaded_hashing` (a low-priority background writer keeps its work on itself)."""
    if nbytes > MULTI_THREAD_HASH_FROM and not getattr(_HASHING, "single", False):
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def single_threaded_hashing() -> None:
    """From now on, hash on the calling thread only (blake3's thread pool runs at normal priority)."""
    _HASHING.single = True


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """blake3 hex digest, multi-threaded for large buffers."""
    h = hasher(len(data))
    h.update(data)
    return str(h.hexdigest())


def file_hash(path: str) -> str:
    """blake3 of a file's bytes (recorded as the source of an import)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return str(h.hexdigest())
