"""One import, start to end: find the source, tell its format (:mod:`~ckptkit.interop.importers.registry`), run
that format's reader, and commit what it collected through the engine's commit, like any save."""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from ckptkit.engine.commit import commit_captured
from ckptkit.engine.manifests import RepoLike, open_repository
from ckptkit.errors import CheckpointExistsError, ImportFormatError, SourceNotFoundError
from ckptkit.hashing import check_name
from ckptkit.interop.importers._common import ImportRecord, describe
from ckptkit.interop.importers._pickle import load_torch
from ckptkit.interop.importers.registry import FORMATS, LAYOUTS, detect_dict, detect_folder, find_reader
from ckptkit.schema import Lineage, Manifest, Progress

__all__ = ["detect_format", "import_from"]


def import_from(
    src: str,
    repo: RepoLike,
    name: str | None = None,
    *,
    format: str | None = None,
    storage_options: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
) -> Manifest:
    """Convert the foreign checkpoint ``src`` (a local file or folder) into checkpoint ``name`` of ``repo``.

    Args:
        src: the checkpoint file or folder on local disk.
        repo: the repository: URL (any fsspec URL), local path or open :class:`~ckptkit.storage.Repository`.
        name: checkpoint name; by default derived from ``src`` (``checkpoint-500``, ``last`` ...).
        format: one of :data:`~ckptkit.interop.importers.FORMATS`; ``None`` detects it.
        storage_options: passed to fsspec for ``repo``.
        model: optional, for formats whose files do not say which model they hold (``lightning``, ``mmdet``,
            ``dcp``, and ``timm`` when ``arch`` is not a timm model name): an instance of the architecture
            (its weights are neither read nor changed) whose parameter names key the optimizer state and whose
            adapter records the model metadata. HF formats rebuild the model from ``config.json`` instead.

    Returns:
        The committed manifest; ``manifest.lineage.source`` records where it came from.

    Raises:
        ArgumentTypeError: ``repo`` is not a URL, a local path or an open Repository.
        SourceNotFoundError: ``src`` does not exist.
        UnsupportedStateError: a file needs unpickling an arbitrary object (the message names the class and entry).
        ImportFormatError: the layout is not one of the formats, or does not hold what its format promises.
        OptimizerMappingError: optimizer state cannot be mapped to parameter names with certainty.
        CheckpointExistsError: ``repo`` already has a checkpoint ``name``.

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> lin = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> torch.save({"pytorch-lightning_version": "2.5.0", "state_dict": lin.state_dict(), "epoch": 1,
        ...             "global_step": 10, "optimizer_states": [opt.state_dict()]}, f"{d}/last.ckpt")
        >>> m = import_from(f"{d}/last.ckpt", f"{d}/repo", model=lin)
        >>> m.name, m.lineage.source["format"], sorted(m.components)
        ('last', 'lightning', ['model', 'optimizer'])
    """
    r = open_repository(repo, storage_options)  # a repo of the wrong type fails before anything is read
    path = os.path.abspath(os.fspath(src))
    if format is not None:
        find_reader(format)  # an unknown name fails before anything is read
    if not os.path.exists(path):
        raise SourceNotFoundError(path, "checkpoint file or folder")
    name = check_name(name if name is not None else _default_name(path))
    if name in r.list():  # fail before reading gigabytes; the commit checks again
        raise CheckpointExistsError(r.url, name)
    fmt, data = _open(path, format)
    imp = ImportRecord(fmt, path)
    find_reader(fmt).load()(imp, data, model)
    for c in imp.components:
        check_name(c.name)
    lineage = Lineage(relation="import", source=imp.source())
    progress = Progress(epoch=max(imp.epoch, 0), global_step=max(imp.global_step, 0))
    return commit_captured(r, imp.components, name, progress=progress, metrics=imp.metrics, hparams=imp.hparams,
                           lineage=lineage)  # fmt: skip


def detect_format(src: str) -> str:
    """Which of :data:`~ckptkit.interop.importers.FORMATS` ``src`` is (reads a file with
    ``torch.load(weights_only=True)`` to tell).

    Raises:
        SourceNotFoundError: ``src`` does not exist.
        ImportFormatError: it is none of them.
        UnsupportedStateError: the file needs unpickling an arbitrary object.
    """
    path = os.path.abspath(os.fspath(src))
    if not os.path.exists(path):
        raise SourceNotFoundError(path, "checkpoint file or folder")
    return _open(path, None)[0]


def _default_name(path: str) -> str:
    base = os.path.basename(path.rstrip(os.sep))
    for ext in (".pth.tar", ".ckpt", ".pth", ".pt", ".bin", ".tar"):
        if base.endswith(ext) and len(base) > len(ext):
            base = base[: -len(ext)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip("._-")[:128]
    return base or "imported"


def _open(path: str, fmt: str | None) -> tuple[str, Any]:
    """The format and, for single files, their content (read once: detection needs it)."""
    reader = find_reader(fmt) if fmt is not None else None
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if reader is None:
            found = detect_folder(files)
            if found is None:
                shown = ", ".join(sorted(files)[:20]) + (" ..." if len(files) > 20 else "")
                raise ImportFormatError(f"cannot tell the format of folder {path}: it holds [{shown}]; known "
                                        f"layouts: {LAYOUTS}; pass the folder of one of them, or its format "
                                        "(import_from(format=...))")  # fmt: skip
            return found, None
        if reader.layout != "folder":
            raise ImportFormatError(f"format {reader.name!r} is a single file ({reader.holds}), but {path} is a "
                                    "folder: pass the checkpoint file inside it, or format=None to detect")  # fmt: skip
        if not reader.detect(files):
            raise ImportFormatError(f"{path} is no {reader.name} folder (expected: {reader.holds}); it holds "
                                    f"[{', '.join(sorted(files)[:20])}]: pass such a folder, or format=None to "
                                    "detect")  # fmt: skip
        return reader.name, None
    if reader is not None and reader.layout == "folder":
        raise ImportFormatError(f"format {reader.name!r} is a folder ({reader.holds}), but {path} is a file: pass "
                                "the folder, or format=None to detect")  # fmt: skip
    data = load_torch(path, (reader.pickle_hint or None) if reader is not None else None)  # None: by its keys
    if reader is not None:
        return reader.name, data
    found = detect_dict(data)
    if found is None:
        raise ImportFormatError(f"cannot tell the format of {path}: {describe(data)}; known layouts: {LAYOUTS}; "
                                f"pass its format (import_from(format=...), one of {', '.join(FORMATS)}) if it is "
                                "one of them")  # fmt: skip
    return found, data
