"""The functions: save, restore, inspect, verify, gc. The manager builds on these."""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import functools
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ckptkit import __version__
from ckptkit.data import is_data_loader
from ckptkit.errors import (
    CheckpointNotFoundError,
    CorruptObjectError,
    IncompleteCheckpointError,
    ManifestError,
    StateMismatchError,
)
from ckptkit.format import DEFAULT_OBJECT_SIZE, decode, group, pack, unpack
from ckptkit.schema import (
    Component,
    DataSegment,
    Environment,
    Lineage,
    Manifest,
    ObjectInfo,
    Progress,
    TensorRef,
    build_manifest,
    dump_manifest,
    parse_manifest,
)
from ckptkit.state import (
    RNG,
    Captured,
    LoadReport,
    Saved,
    Stateful,
    capture,
    check_targets,
    determinism_flags,
    kind_of,
    param_names,
    restore_model,
    restore_optimizer,
    restore_rng,
    restore_stateful,
)
from ckptkit.storage import Repository, check_name

log = logging.getLogger("ckptkit")

RepoLike = str | os.PathLike[str] | Repository


def open_repository(repo: RepoLike, storage_options: dict[str, Any] | None = None) -> Repository:
    """A :class:`Repository` for a URL (or the repository itself)."""
    if isinstance(repo, Repository):
        if storage_options:
            raise ValueError("storage_options apply to a URL; this repository is already open")
        return repo
    return Repository(repo, storage_options)


# --- save ------------------------------------------------------------------------------------------------------


@functools.cache
def _environment() -> Environment:
    rev = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        if out.returncode == 0:
            rev = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None  # no git here: the revision is optional
    return Environment(
        ckptkit=__version__, torch=torch.__version__, python=platform.python_version(),
        platform=f"{sys.platform}-{platform.machine()}", host=socket.gethostname(),
        code_revision=os.environ.get("CKPTKIT_CODE_REVISION", rev),
    )  # fmt: skip


def save(
    repo: RepoLike,
    state: Mapping[str, object],
    name: str,
    *,
    progress: Progress | None = None,
    metrics: Mapping[str, float] | None = None,
    hparams: Mapping[str, Any] | None = None,
    data: list[DataSegment] | None = None,
    lineage: Lineage | None = None,
    rng: bool = True,
    object_size: int = DEFAULT_OBJECT_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save ``state`` as checkpoint ``name``: objects first, manifest last (the commit).

    Args:
        repo: repository URL (any fsspec URL) or an open :class:`Repository`.
        state: components by name: models, optimizers, schedulers, grad scalers, any object with
            ``state_dict()``/``load_state_dict()``, or JSON-able values.
        name: checkpoint name (letters, digits, ``.``, ``_``, ``-``); an existing name is an error.
        progress, metrics, hparams, data, lineage: recorded in the manifest.
        rng: also capture python, numpy, torch CPU and CUDA RNG state.
        object_size: target bytes per stored object.

    Returns:
        The committed manifest (``manifest.id`` is the checkpoint's hash).

    Example:
        >>> import torch, ckptkit
        >>> model = torch.nn.Linear(2, 2)
        >>> m = ckptkit.save("memory://doc-save", {"model": model}, "first")
        >>> m.name, len(m.id)
        ('first', 64)
    """
    check_name(name)
    if object_size <= 0:
        raise ValueError(f"object_size must be positive, got {object_size}")
    r = open_repository(repo, storage_options)
    captured = capture(state, rng=rng)
    return commit_captured(r, captured, name, progress=progress, metrics=metrics, hparams=hparams, data=data,
                           lineage=lineage, object_size=object_size)  # fmt: skip


def commit_captured(
    r: Repository,
    captured: list[Captured],
    name: str,
    *,
    progress: Progress | None = None,
    metrics: Mapping[str, float] | None = None,
    hparams: Mapping[str, Any] | None = None,
    data: list[DataSegment] | None = None,
    lineage: Lineage | None = None,
    object_size: int = DEFAULT_OBJECT_SIZE,
) -> Manifest:
    """Pack captured components into objects, store the missing ones, and commit the manifest."""
    packed = {}
    refs: dict[str, dict[str, TensorRef]] = {}
    for comp in captured:
        refs[comp.name] = {}
        by_class: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for key, t in comp.tensors.items():
            by_class.setdefault(comp.classes.get(key, "state"), []).append((key, t))
        for entries in by_class.values():
            tensors = dict(entries)
            for keys in group(entries, object_size):
                obj = pack([(k, tensors[k]) for k in keys])
                packed[obj.hash] = obj
                for k in keys:
                    t = tensors[k]
                    refs[comp.name][k] = TensorRef(object=obj.hash, key=k, dtype=_code(t), shape=list(t.shape))
    components = {
        c.name: Component(kind=c.kind, adapter=c.adapter, type=c.type, tensors=refs[c.name], aliases=c.aliases,
                          state=c.json, meta=c.meta)
        for c in captured
    }
    manifest = build_manifest(
        name=name,
        created_at=_dt.datetime.now(_dt.timezone.utc),
        environment=_environment(),
        progress=progress or Progress(),
        components=components,
        objects={h: ObjectInfo(size=o.size) for h, o in packed.items()},
        data=list(data or []),
        hparams=dict(hparams or {}),
        metrics=dict(metrics or {}),
        lineage=lineage or Lineage(),
    )
    raw = dump_manifest(manifest)
    with r.pending(packed):
        r.write_objects([(h, packed[h].chunks()) for h in r.missing_objects(packed)])
        r.commit(name, raw)
    return manifest


def _code(t: torch.Tensor) -> Any:
    from ckptkit.format import dtype_code

    return dtype_code(t.dtype)


# --- reading ---------------------------------------------------------------------------------------------------


def inspect(repo: RepoLike, name: str | None = None, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The validated manifest of checkpoint ``name`` (the latest when ``None``). Reads no tensors.

    Example:
        >>> import torch, ckptkit
        >>> _ = ckptkit.save("memory://doc-inspect", {"model": torch.nn.Linear(2, 2)}, "a")
        >>> ckptkit.inspect("memory://doc-inspect", "a").components["model"].kind
        'model'
    """
    r = open_repository(repo, storage_options)
    if name is None:
        latest = checkpoints(r)
        if not latest:
            raise CheckpointNotFoundError(r.url, None)
        return latest[-1]
    return parse_manifest(r.read_manifest(name), f"{r.url}/checkpoints/{name}.json")


def checkpoints(repo: RepoLike, storage_options: dict[str, Any] | None = None) -> list[Manifest]:
    """Every committed checkpoint that parses, oldest first (by creation time, then step).

    A manifest that does not parse is skipped with a warning (``ckptkit verify`` reports it).
    """
    return _scan(open_repository(repo, storage_options))[0]


def _scan(r: Repository) -> tuple[list[Manifest], list[tuple[str, str]]]:
    out = []
    failed: list[tuple[str, str]] = []
    for n in r.list():
        try:
            out.append(parse_manifest(r.read_manifest(n), f"{r.url}/checkpoints/{n}.json"))
        except CheckpointNotFoundError:
            continue  # deleted while we listed
        except ManifestError as err:
            log.warning("skipping checkpoint %s: %s", n, err)
            failed.append((n, str(err)))
    out.sort(key=lambda m: (m.created_at, m.progress.global_step, m.name))
    return out, failed


def load_tensors(r: Repository, manifest: Manifest, components: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Read (and hash-verify) the objects that ``components`` need; tensors by component and key."""
    needed = sorted({ref.object for c in components for ref in manifest.components[c].tensors.values()})
    for h in needed:
        if h not in manifest.objects:
            raise ManifestError(f"{manifest.name}", f"object {h} is referenced but not listed in `objects`")
    objects: dict[str, dict[str, torch.Tensor]] = {}
    missing = []

    def fetch(h: str) -> dict[str, torch.Tensor] | None:
        try:
            return unpack(r.read_object(h, manifest.objects[h].size), r.object_path(h))
        except FileNotFoundError:
            return None

    # Two objects in flight: one is hashed while the next is read (and remote reads overlap their latency).
    workers = min(len(needed), 2 if r.local else 8) or 1
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckptkit-read") as pool:
        for h, tensors in zip(needed, pool.map(fetch, needed), strict=True):
            if tensors is None:
                missing.append(h)
            else:
                objects[h] = tensors
    if missing:
        raise IncompleteCheckpointError(manifest.name, [r.object_path(h) for h in missing])
    out: dict[str, dict[str, torch.Tensor]] = {}
    for c in components:
        out[c] = {}
        for key, ref in manifest.components[c].tensors.items():
            t = objects[ref.object].get(ref.key)
            if t is None or list(t.shape) != ref.shape:
                raise CorruptObjectError(r.object_path(ref.object), f"tensor {ref.key!r} {ref.shape}",
                                         "absent" if t is None else f"shape {list(t.shape)}")  # fmt: skip
            out[c][key] = t
    return out


@dataclass
class Fidelity:
    """Whether a restore resumes training exactly. ``issues`` says what is missing when it does not.

    Example:
        >>> Fidelity([]).exact, str(Fidelity(["no RNG state"]))
        (True, 'not exact: no RNG state')
    """

    issues: list[str]

    @property
    def exact(self) -> bool:
        return not self.issues

    def __str__(self) -> str:
        return "exact" if self.exact else "not exact: " + "; ".join(self.issues)


@dataclass
class RestoreResult:
    """What :func:`restore` did.

    Attributes:
        manifest: the checkpoint that was restored (``.name``, ``.id``, ``.progress``, ``.metrics`` ...).
        reports: per-component load reports (all ``ok`` after a strict restore).
        values: plain values saved in the checkpoint, by component name.
        fidelity: whether training resumes exactly, and if not, what is missing.
        skipped: newer checkpoints passed over (corrupt, incomplete, unreadable), with the reason.
    """

    manifest: Manifest
    reports: dict[str, LoadReport] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    fidelity: Fidelity = field(default_factory=lambda: Fidelity([]))
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def progress(self) -> Progress:
        """Where training stood at the checkpoint."""
        return self.manifest.progress


_ORDER: dict[str, int] = {"model": 0, "optimizer": 1, "scheduler": 2, "grad_scaler": 3, "stateful": 4, "value": 5}


def restore(
    repo: RepoLike,
    state: Mapping[str, object],
    name: str | None = None,
    *,
    strict: bool = True,
    rng: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> RestoreResult:
    """Restore checkpoint ``name`` (the latest when ``None``) into the live objects of ``state``.

    Every object read is hash-verified before anything is loaded. Components are restored in dependency
    order (models, optimizers, schedulers, scalers, others) and process RNG last, so nothing a
    ``load_state_dict`` draws shifts the restored streams.

    Args:
        strict: raise :class:`StateMismatchError` when keys or shapes differ; with ``strict=False`` load what
            fits and return the per-component reports.
        rng: restore process RNG state when the checkpoint has it.

    Raises:
        CheckpointNotFoundError, CorruptObjectError, IncompleteCheckpointError, StateMismatchError.

    Example:
        >>> import torch, ckptkit
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = ckptkit.save("memory://doc-restore", {"model": model}, "a")
        >>> ckptkit.restore("memory://doc-restore", {"model": torch.nn.Linear(2, 2)}).manifest.name
        'a'
    """
    r = open_repository(repo, storage_options)
    check_targets(state)
    skipped: list[tuple[str, str]] = []
    if name is not None:
        candidates = [inspect(r, name)]
    else:
        found, skipped = _scan(r)
        candidates = found[::-1]
        if not candidates:
            raise CheckpointNotFoundError(r.url, None, [n for n, _ in skipped])
    for i, manifest in enumerate(candidates):
        wanted = _check_components(manifest, state, strict, rng)
        try:
            tensors = load_tensors(r, manifest, wanted)  # reads and verifies everything before loading anything
        except (CorruptObjectError, IncompleteCheckpointError, ManifestError) as err:
            if name is not None or i == len(candidates) - 1:
                raise
            log.warning("restore: skipping %s: %s", manifest.name, err)
            skipped.append((manifest.name, str(err)))
            continue
        result = _restore_into(manifest, state, tensors, wanted, strict, rng)
        result.skipped = skipped
        if skipped:
            log.warning("restore: fell back to %s; skipped %s", manifest.name, ", ".join(n for n, _ in skipped))
        log.info("restore %s: %s", manifest.name, result.fidelity)
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _check_components(manifest: Manifest, state: Mapping[str, object], strict: bool, rng: bool) -> list[str]:
    saved_comps = manifest.components
    absent = [n for n in state if n not in saved_comps]
    if absent and strict:
        raise StateMismatchError(
            ", ".join(absent), f"not in checkpoint {manifest.name!r} (it has {', '.join(saved_comps)})",
            "pass strict=False to restore the others",
        )
    for n, obj in state.items():
        if n in saved_comps and saved_comps[n].kind != kind_of(obj):
            raise StateMismatchError(n, f"saved as a {saved_comps[n].kind}, given a {kind_of(obj)}",
                                     "pass the same kind of object that was saved under this name")  # fmt: skip
    return [n for n in saved_comps if n in state or saved_comps[n].kind == "value" or (rng and n == RNG)]


def _restore_into(
    manifest: Manifest,
    state: Mapping[str, object],
    tensors: dict[str, dict[str, torch.Tensor]],
    wanted: list[str],
    strict: bool,
    rng: bool,
) -> RestoreResult:
    saved_comps = manifest.components

    def saved(n: str) -> Saved:
        c = saved_comps[n]
        return Saved(c.kind, c.state, tensors[n], c.aliases, c.adapter, c.meta)

    result = RestoreResult(manifest)
    issues = result.fidelity.issues
    names = param_names(state)
    for n in sorted((n for n in state if n in saved_comps), key=lambda n: _ORDER[saved_comps[n].kind]):
        obj = state[n]
        if isinstance(obj, torch.nn.Module):
            result.reports[n] = restore_model(n, obj, saved(n), strict)
        elif isinstance(obj, torch.optim.Optimizer):
            result.reports[n] = restore_optimizer(n, obj, saved(n), names, strict)
        elif isinstance(obj, Stateful):
            restore_stateful(n, obj, saved(n))
    for n in wanted:
        if saved_comps[n].kind == "value":
            result.values[n] = decode(saved_comps[n].state, tensors[n], n)
    for n in state:
        if n not in saved_comps:
            result.reports[n] = LoadReport(n, missing=["(whole component)"])
            issues.append(f"{n!r} is not in the checkpoint and starts fresh")
    for n, rep in result.reports.items():
        if not rep.ok and n in saved_comps:
            issues.append(f"{n!r} was restored partially ({rep})")
    for n, c in saved_comps.items():
        if n not in state and c.kind in ("model", "optimizer", "scheduler", "grad_scaler", "stateful"):
            issues.append(f"the checkpoint's {c.kind} {n!r} was not restored (not passed in)")
    if rng and RNG in saved_comps:
        issues.extend(restore_rng(saved(RNG)))
        issues.extend(_determinism_issues(saved_comps[RNG].meta))
    elif rng:
        issues.append("checkpoint holds no RNG state: random streams (dropout, augmentation) start anew")
    else:
        issues.append("RNG not restored (rng=False)")
    if not any(is_data_loader(obj) for obj in state.values()):
        issues.append("no data-loader state captured: the resumed run does not know which batches it already saw "
                      "(use ckptkit.data.ResumableLoader, LoaderPosition or torchdata's StatefulDataLoader)")
    return result


def _determinism_issues(saved: Mapping[str, Any]) -> list[str]:
    now = determinism_flags()
    issues = []
    if now["cudnn_benchmark"] or saved.get("cudnn_benchmark"):
        issues.append("torch.backends.cudnn.benchmark is enabled: cuDNN picks algorithms by timing, so GPU results "
                      "can differ from the uninterrupted run")  # fmt: skip
    if (now["cuda"] or saved.get("cuda")) and not now["deterministic_algorithms"]:
        issues.append("non-deterministic algorithms are enabled on CUDA: call "
                      "torch.use_deterministic_algorithms(True) for a bit-exact resume")  # fmt: skip
    return issues


# --- verify and gc -------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """Result of :func:`verify` for one checkpoint; ``problems`` is empty when it is intact."""

    name: str
    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    repo: RepoLike, name: str | None = None, storage_options: dict[str, Any] | None = None
) -> list[VerifyReport]:
    """Check checkpoints end to end: manifest parses and matches its id, every object exists and hashes to its
    name, every tensor is where the manifest says. ``name=None`` verifies every checkpoint.

    Example:
        >>> import torch, ckptkit
        >>> _ = ckptkit.save("memory://doc-verify", {"model": torch.nn.Linear(2, 2)}, "a")
        >>> [r.ok for r in ckptkit.verify("memory://doc-verify")]
        [True]
    """
    r = open_repository(repo, storage_options)
    names = [name] if name is not None else r.list()
    if name is not None:
        check_name(name)
    reports = []
    checked: dict[str, str | None] = {}  # object hash -> problem (None when fine), shared across checkpoints
    for n in names:
        rep = VerifyReport(n)
        reports.append(rep)
        try:
            manifest = parse_manifest(r.read_manifest(n), f"{r.url}/checkpoints/{n}.json")
        except (ManifestError, CheckpointNotFoundError) as err:
            rep.problems.append(str(err))
            continue
        for h, info in manifest.objects.items():
            rep.objects += 1
            rep.bytes += info.size
            if h not in checked:
                checked[h] = _check_object(r, manifest, h, info.size)
            if checked[h]:
                rep.problems.append(str(checked[h]))
    return reports


def _check_object(r: Repository, manifest: Manifest, h: str, size: int) -> str | None:
    try:
        tensors = unpack(r.read_object(h, size), r.object_path(h))
    except FileNotFoundError:
        return f"object {r.object_path(h)} is missing"
    except CorruptObjectError as err:
        return str(err)
    for cname, comp in manifest.components.items():
        for key, ref in comp.tensors.items():
            if ref.object == h and (ref.key not in tensors or list(tensors[ref.key].shape) != ref.shape):
                return f"object {r.object_path(h)} lacks tensor {ref.key!r} of {cname}.{key} as the manifest describes"
    return None


def gc(repo: RepoLike, dry_run: bool = False, storage_options: dict[str, Any] | None = None) -> Any:
    """Delete objects no committed checkpoint references (never those of a save in progress).

    Refuses to run while a manifest in the repository cannot be parsed, since its objects would look
    unreferenced. Returns a :class:`~ckptkit.storage.GcReport`.
    """
    r = open_repository(repo, storage_options)
    with r.gc_lock():
        referenced: set[str] = set()
        for n in r.list():
            try:
                m = parse_manifest(r.read_manifest(n), f"{r.url}/checkpoints/{n}.json")
            except CheckpointNotFoundError:
                continue  # deleted while we listed
            except ManifestError as err:
                raise ManifestError(
                    f"{r.url}/checkpoints/{n}.json",
                    f"{err.problem}; gc refuses to run while a manifest is unreadable, because the objects it "
                    "references would look unreferenced: repair or delete it first",
                ) from err
            referenced.update(m.objects)
        return r.sweep(referenced, dry_run=dry_run)


Which = Literal["latest", "best"]
