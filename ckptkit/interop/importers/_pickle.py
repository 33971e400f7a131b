"""Reading torch pickles without unpickling arbitrary objects: the pickletools scan for the globals a file needs
(:func:`unsafe_globals`), and the refusal naming each class and the entry that holds it, found by an unpickler that
rebuilds only the containers and imports nothing. A torch file is a zip archive: :func:`check_archive` refuses one
whose members would inflate far beyond its size (a zip bomb) before anything is inflated."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import IO, Any

import torch

from ckptkit.errors import CkptkitError, ImportFormatError, SourceNotFoundError, UnsupportedStateError
from ckptkit.interop.importers.registry import detect_dict, find_reader

__all__ = [
    "DATA_CLASSES",
    "GENERIC_HINT",
    "INFLATE_CAP",
    "INFLATE_FLOOR",
    "INFLATE_RATIO",
    "PlainObject",
    "RefusedPickleError",
    "check_archive",
    "data_globals",
    "load_torch",
    "refusal",
    "unsafe_globals",
]


class RefusedPickleError(UnsupportedStateError):
    """A source file needs unpickling a Python object (not a tensor or plain container): it is not read."""

    __module__ = "ckptkit.interop.importers"  # where users import it from (repr, pickling), as before the split

    def __init__(self, message: str, where: str, value_type: str) -> None:
        CkptkitError.__init__(self, message)
        self.where = where
        self.value_type = value_type


GENERIC_HINT = (
    "Load it yourself where you trust its source and re-save only tensors and plain values (a state dict, numbers, "
    "strings, lists, dicts), or as safetensors."
)
"""How to re-save a file that needs unpickling objects, for any format."""


INFLATE_RATIO = 16
"""A zip archive's compressed members may inflate to this many times the archive's size (torch.save stores its
members uncompressed, so a torch file inflates to about its own size) ..."""
INFLATE_FLOOR = 64 << 20
"""... or to this many bytes, for small archives ..."""
INFLATE_CAP = 8 << 30
"""... and never to more than this many bytes, whatever the archive's size."""


def check_archive(source: str | IO[bytes] | io.RawIOBase, where: str, size: int | None = None) -> None:
    """Refuse a zip archive (the format of ``torch.save``) whose members declare more uncompressed bytes than it
    can hold, before anything is inflated: compressed members may inflate to ``max(INFLATE_FLOOR, INFLATE_RATIO *
    size)`` bytes and never more than ``INFLATE_CAP``; a stored (uncompressed) member must be as large as it says.
    Inflation stops at the declared size (Python's zipfile and torch's reader both hold members to it), so this
    bounds the memory a small file can make an import allocate. Anything that is not a zip archive passes.

    Args:
        source: a path, or a seekable binary file positioned anywhere (a slice of a DCP data file).
        where: the file, named in the error.
        size: the archive's size in bytes (default: the file's).

    Raises:
        ImportFormatError: the archive would inflate past the limit, or a stored member claims more bytes than it has.
    """
    try:
        if size is None:
            size = os.path.getsize(source) if isinstance(source, str) else source.seek(0, io.SEEK_END)
        if not zipfile.is_zipfile(source):
            return
        with zipfile.ZipFile(source) as zf:
            infos = zf.infolist()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, NotImplementedError):
        return  # not an archive Python can list: torch's own reader refuses it, having inflated nothing
    limit = min(INFLATE_CAP, max(INFLATE_FLOOR, INFLATE_RATIO * size))
    inflated = 0
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise ImportFormatError(f"refusing {where}: its archive member {info.filename!r} is stored uncompressed "
                                    f"but declares {info.file_size} bytes for {info.compress_size} stored: the "
                                    "archive is damaged or forged; nothing was read")  # fmt: skip
        if info.compress_type != zipfile.ZIP_STORED:
            inflated += info.file_size
    if inflated > limit:
        raise ImportFormatError(
            f"refusing {where}: its compressed archive members declare {inflated} bytes uncompressed from a "
            f"{size}-byte file, more than the {limit} bytes an import inflates (at most {INFLATE_RATIO}x the file, "
            f"or {INFLATE_FLOOR >> 20} MiB, and never {INFLATE_CAP >> 30} GiB): a zip bomb or a damaged archive; "
            "nothing was inflated. torch.save writes archives that inflate to about their own size: re-save it so"
        )


class PlainObject(dict[str, Any]):
    """A pickled object of one of :data:`DATA_CLASSES`, read as the plain dict of its attributes: nothing of its
    class is imported or run (the unpickler builds this class instead, and only stores the attributes).

    Example:
        >>> import argparse, io, torch
        >>> buf = io.BytesIO()
        >>> torch.save({"args": argparse.Namespace(lr=0.1, model="resnet18")}, buf)
        >>> with open("/tmp/ckptkit-doc-args.pth", "wb") as f:
        ...     _ = f.write(buf.getvalue())
        >>> args = load_torch("/tmp/ckptkit-doc-args.pth")["args"]
        >>> args.type_name, dict(args)
        ('argparse.Namespace', {'lr': 0.1, 'model': 'resnet18'})
    """

    type_name = "?"
    """The class the file named (``argparse.Namespace`` ...)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            for part in state:
                if isinstance(part, dict):
                    self.update(part)
        elif isinstance(state, dict):
            self.update(state)
        else:
            self["__state__"] = state

    def __repr__(self) -> str:
        return f"PlainObject({self.type_name}, {dict.__repr__(self)})"


DATA_CLASSES: tuple[str, ...] = (
    "argparse.Namespace",  # timm train.py's `args`
    "mmengine.logging.history_buffer.HistoryBuffer",  # an mmengine Runner's message_hub scalars
)
"""Classes of training frameworks that hold only data: a file's object of one of them is read as a
:class:`PlainObject` of its attributes. numpy arrays, scalars and dtypes are read as numpy values, rebuilt by
numpy's own pickle functions (the ones ``torch.load`` documents for allowlisting)."""


def _attribute_of_data_class(obj: Any, name: Any) -> str:
    """Stands in for ``builtins.getattr`` in a pickle: a data class's attribute (HistoryBuffer pickles references to
    its statistics methods as ``getattr(HistoryBuffer, "mean")``) is read as its dotted name; anything else stops."""
    if isinstance(obj, type) and issubclass(obj, PlainObject) and isinstance(name, str):
        return f"{obj.type_name}.{name}"
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) in the pickle: not data")


@functools.cache
def data_globals() -> list[Any]:
    """What :func:`load_torch` allows beside torch's own list: numpy's array, scalar and dtype rebuilders (under
    numpy 1's and 2's module names), a :class:`PlainObject` stand-in for each of :data:`DATA_CLASSES`, and a
    ``getattr`` that only names those stand-ins' attributes."""
    out: list[Any] = [(type(f"PlainObject[{name}]", (PlainObject,), {"type_name": name}), name)
                      for name in DATA_CLASSES]  # fmt: skip
    out.append((_attribute_of_data_class, "builtins.getattr"))
    try:
        import numpy as np
    except ImportError:
        return out
    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    out += [np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    for n in dir(dtypes) if dtypes is not None else []:
        cls = getattr(dtypes, n)
        if isinstance(cls, type) and issubclass(cls, np.dtype) and n != "ObjectDType":
            out.append(cls)
    return out


def load_torch(path: str, hint: str | None = GENERIC_HINT) -> Any:
    """``torch.load(weights_only=True)``, after :func:`check_archive`; a refusal becomes an error naming the classes
    and entries needing pickle (``hint=None``: the advice suits the format the file's keys suggest). Beside tensors
    and plain containers it reads numpy arrays, scalars and dtypes (as numpy values) and the data-only classes of
    :data:`DATA_CLASSES` (as :class:`PlainObject` dicts); nothing else.

    Raises:
        SourceNotFoundError: ``path`` is not a file.
        ImportFormatError: the archive would inflate far beyond its size, or the file is empty, truncated or not a
            torch file.
        RefusedPickleError: the file needs unpickling Python objects (the message names each and its entry).
        UnsupportedStateError: torch's weights-only unpickler refused it for another reason.
    """
    if not os.path.isfile(path):
        raise SourceNotFoundError(path, "file")
    check_archive(path, path)
    try:
        with torch.serialization.safe_globals(data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ... for what it cannot read
        # Drop torch's frames now: they hold the pickle it read, which the scan below reads again.
        failure = err.with_traceback(None)
    detail = " ".join(str(failure).split()[:40]) or "no message"
    with _torch_pickle(path) as pkl:
        refused = refusal(path, pkl, hint)
    if refused is not None:
        raise refused from failure
    if isinstance(failure, pickle.UnpicklingError) and "weights only" in detail.lower():
        raise UnsupportedStateError(
            path, "a pickled object", f"torch.load(weights_only=True) refused it ({detail[:300]}); only tensors and "
            "plain containers are read: re-save it as a state_dict of tensors or as safetensors",
        ) from failure  # fmt: skip
    raise ImportFormatError(f"cannot read {path} as a torch file ({type(failure).__name__}: {detail[:300]}): it is "
                            "empty, truncated or damaged, or was not written by torch.save") from failure  # fmt: skip


def _format_hint(fmt: str | None) -> str:
    return (find_reader(fmt).pickle_hint if fmt else "") or GENERIC_HINT


def refusal(
    where: str, data: bytes | IO[bytes] | None, hint: str | None, entry_prefix: str = ""
) -> RefusedPickleError | None:
    """The error for pickle ``data`` (read from ``where``; bytes, or a seekable stream read from where it stands)
    that needs globals torch's weights-only unpickler does not allow, naming each and the entries (prefixed by
    ``entry_prefix``) that hold it, or None when the pickle needs none (or cannot be scanned). ``hint=None``: the
    advice suits the format the pickle's keys suggest."""
    if data is None:
        return None
    stream = _stream(data)
    try:
        start = stream.tell()
        found = unsafe_globals(stream)
    except Exception:  # not a pickle we can scan: keep the original error
        return None
    if not found:
        return None
    located: dict[str, list[str]] = {}
    root: Any = None
    with contextlib.suppress(Exception):  # locating is a courtesy: naming the class is what matters
        stream.seek(start)
        located, root = _locate(stream, set(found))
    if hint is None:
        hint = _format_hint(detect_dict(root))
    parts = []
    for g in found:
        entries = [(entry_prefix + e if e else entry_prefix.rstrip(".")) or "(the whole file)"
                   for e in located.get(g, [])]  # fmt: skip
        more = f" (and {len(entries) - 3} more)" if len(entries) > 3 else ""
        shown = ", ".join(repr(e) for e in entries[:3]) + more
        parts.append(f"entry {shown} needs {g}" if entries else f"an entry needs {g}")
    msg = (f"cannot import {where}: {'; '.join(parts)}: a pickled Python object, not a tensor or a plain container; "
           "ckptkit reads only tensors and plain containers (torch.load(weights_only=True)) and never unpickles "
           f"arbitrary objects, because unpickling can run any code. {hint}")  # fmt: skip
    return RefusedPickleError(msg, where, ", ".join(found))


@contextlib.contextmanager
def _torch_pickle(path: str) -> Iterator[IO[bytes] | None]:
    """The main pickle of a torch file, as a stream (``<archive>/data.pkl`` in the zip format, inflated as it is
    read; the whole file for the legacy one), or None. Nothing is read into memory as a whole."""
    with contextlib.ExitStack() as stack:
        stream: IO[bytes] | None = None
        try:
            if zipfile.is_zipfile(path):
                zf = stack.enter_context(zipfile.ZipFile(path))
                pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                stream = stack.enter_context(zf.open(pkl[0])) if pkl else None
            else:
                stream = stack.enter_context(open(path, "rb"))
        except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError):
            stream = None
        yield stream


@functools.cache
def _python2_names() -> tuple[dict[tuple[str, str], tuple[str, str]], dict[str, str]]:
    """How torch's weights-only unpickler renames the Python 2 globals of protocol 0-2 pickles (``torch.save``
    writes protocol 2, so a set is ``__builtin__.set``): taken from torch, so the scan reads names as torch does."""
    try:
        from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # what torch._weights_only_unpickler applies

        return dict(NAME_MAPPING), dict(IMPORT_MAPPING)
    except ImportError:  # private API moved: the renames torch.save's own pickles need
        return {}, {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _allowed_globals() -> set[str]:
    """What :func:`load_torch` accepts (torch's allowlist, what the user allowlisted, and the data globals)."""
    user = set()
    for g in [*torch.serialization.get_safe_globals(), *data_globals()]:
        user.add(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    try:
        from torch import _weights_only_unpickler as wu

        return set(wu._get_allowed_globals()) | user
    except (ImportError, AttributeError):  # private API moved: torch's documented defaults
        return user | {
            "collections.OrderedDict", "collections.Counter", "torch.Size", "torch.device", "torch.Tensor",
            "_codecs.encode", "builtins.set", "builtins.complex", "builtins.bytearray",
            "torch.serialization._get_layout", "torch.nn.parameter.Parameter", "torch._tensor._rebuild_from_type_v2",
        } | {f"torch._utils.{f}" for f in dir(torch._utils) if f.startswith("_rebuild_")}  # fmt: skip


def _stream(data: bytes | IO[bytes]) -> IO[bytes]:
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


def unsafe_globals(data: bytes | IO[bytes]) -> list[str]:
    """Classes and functions a pickle names (``GLOBAL`` / ``STACK_GLOBAL`` opcodes) that torch's weights-only
    unpickler does not allow, in order of first use. Scans the opcodes with :mod:`pickletools`; runs nothing.

    A legacy (non-zip) torch file is several pickles back to back: each is scanned until the data ends or stops
    being a pickle.

    Example:
        >>> import argparse, pathlib, pickle
        >>> unsafe_globals(pickle.dumps({"data": pathlib.PurePosixPath("/data")}, protocol=2))
        ['pathlib.PurePosixPath']
        >>> unsafe_globals(pickle.dumps({"data": pathlib.PurePosixPath("/data")}, protocol=4))
        ['pathlib.PurePosixPath']
        >>> unsafe_globals(pickle.dumps({"args": argparse.Namespace(lr=0.1)}, protocol=2))  # data: read as a dict
        []
    """
    allowed = _allowed_globals()
    found: list[str] = []
    stream = _stream(data)
    for n in range(5):  # a legacy torch file: magic number, protocol, sys info, the data, storage keys
        if not stream.read(1):
            break
        stream.seek(-1, io.SEEK_CUR)
        try:
            names = _scan_one(stream)
        except Exception:
            if n == 0:
                raise
            break  # raw storage bytes after the pickles of a legacy torch file
        for g in names:
            if g not in allowed and not _is_torch_type(g) and g not in found:
                found.append(g)
    return found


def _is_torch_type(g: str) -> bool:
    # dtypes, layouts and legacy storage classes are allowlisted by name inside torch (e.g. torch.float32)
    mod, _, attr = g.rpartition(".")
    return mod == "torch" and isinstance(getattr(torch, attr, None), (torch.dtype, torch.layout))


_MARK = object()


def _scan_one(stream: IO[bytes]) -> list[str]:
    """Globals of one pickle, tracking an abstract stack so ``STACK_GLOBAL`` operands (strings pushed earlier,
    possibly through the memo) are known."""
    names: list[str] = []
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    name_mapping, import_mapping = _python2_names()
    for op, arg, _pos in pickletools.genops(stream):
        nm = op.name
        if nm in ("GLOBAL", "INST"):
            module, _, qualname = str(arg).partition(" ")
            # protocol 0-2 pickles name Python 2 modules (__builtin__ ...): map them as pickle's fix_imports does
            if (module, qualname) in name_mapping:
                module, qualname = name_mapping[(module, qualname)]
            else:
                module = import_mapping.get(module, module)
            names.append(f"{module}.{qualname}")
            if nm == "INST":
                _pop_mark(stack)
            stack.append(None)
        elif nm == "STACK_GLOBAL":
            qual = stack.pop() if stack else None
            mod = stack.pop() if stack else None
            names.append(f"{mod}.{qual}" if isinstance(mod, str) and isinstance(qual, str) else "<unknown global>")
            stack.append(None)
        elif nm in ("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                    "SHORT_BINSTRING"):  # fmt: skip
            stack.append(arg)
        elif nm == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif nm in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg or 0)] = stack[-1] if stack else None
        elif nm in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg or 0)))
        elif nm == "MARK":
            stack.append(_MARK)
        elif nm == "STOP":
            break
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                _pop_mark(stack)
                extra = before.index(pickletools.markobject)
            else:
                extra = len(before)
            for _ in range(extra):
                if stack:
                    stack.pop()
            stack.extend([None] * len(op.stack_after))
    return names


def _pop_mark(stack: list[Any]) -> None:
    while stack:
        if stack.pop() is _MARK:
            return


class _Opaque:
    """Stand-in for any global while locating refused classes: stores its arguments, runs nothing."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = list(args) + list(kwargs.values())
        obj.__dict__["_items"] = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_items"].append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_items"].append(value)

    def append(self, value: Any) -> None:
        self.__dict__["_items"].append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__["_items"].extend(values)

    def add(self, value: Any) -> None:
        self.__dict__["_items"].append(value)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


class _Locator(pickle.Unpickler):
    """Rebuilds the container structure of a pickle with every global replaced by an inert :class:`_Opaque`
    subclass named after it (only ``collections.OrderedDict``, a plain container, is real), so the path of a
    refused object inside the file can be reported. No class or function from the file is ever imported."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(stream)
        self._types: dict[str, type[_Opaque]] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full == "collections.OrderedDict":
            return OrderedDict
        if full not in self._types:
            self._types[full] = type("_Opaque", (_Opaque,), {"global_name": full})
        return self._types[full]

    def persistent_load(self, pid: Any) -> Any:
        return self.find_class("torch", "storage")()


def _locate(data: bytes | IO[bytes], wanted: set[str]) -> tuple[dict[str, list[str]], Any]:
    """Where each of ``wanted`` sits in the pickle: dotted paths of keys and indices (``hyper_parameters.args``)."""
    stream = _stream(data)
    root = _Locator(stream).load()
    if root == _LEGACY_MAGIC:  # legacy torch file: magic number, protocol, sys info, then the data
        _Locator(stream).load()
        _Locator(stream).load()
        root = _Locator(stream).load()
    out: dict[str, list[str]] = {}
    seen: set[int] = set()

    def walk(obj: Any, path: str, depth: int) -> None:
        if depth > 60 or id(obj) in seen:
            return
        if isinstance(obj, _Opaque):
            seen.add(id(obj))
            if obj.global_name in wanted:
                out.setdefault(obj.global_name, []).append(path)
                return
            for v in obj.__dict__["_args"] + obj.__dict__["_items"]:
                walk(v, path, depth + 1)
        elif isinstance(obj, dict):
            seen.add(id(obj))
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            seen.add(id(obj))
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]", depth + 1)

    walk(root, "", 0)
    return out, root
