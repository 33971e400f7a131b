"""Restore a checkpoint into live objects: pick the checkpoint (falling back past damaged ones), read and
verify every tensor, decode and check every component against its live object, and only then load, in dependency
order, RNG last; report fidelity. Internal engine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptkit.engine.manifests import read_manifest, scan
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import (
    CheckpointNotFoundError,
    CorruptObjectError,
    IncompleteCheckpointError,
    ManifestError,
    NoRestorableCheckpointError,
    StateMismatchError,
)
from ckptkit.format import decode
from ckptkit.schema import Manifest, Progress
from ckptkit.state import RNG, LoadReport, Saved, Stateful, check_targets, is_data_loader, kind_of
from ckptkit.state.capture import determinism_flags, param_names
from ckptkit.state.restore import prepare_model, prepare_optimizer, prepare_rng, prepare_stateful
from ckptkit.storage import Repository

__all__ = ["Fidelity", "RestoreResult", "restore_state"]

log = logging.getLogger("ckptkit")


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


def restore_state(
    r: Repository, state: Mapping[str, object], name: str | None = None, *, strict: bool = True, rng: bool = True
) -> RestoreResult:
    """Restore checkpoint ``name`` (the latest that can be read when ``None``) into ``state``; see
    :func:`ckptkit.restore`.

    Raises:
        CheckpointNotFoundError: the repository holds no checkpoint (or none named ``name``).
        NoRestorableCheckpointError: ``name=None``, it holds checkpoints, and none can be restored.
    """
    check_targets(state)
    skipped: list[tuple[str, str]] = []
    if name is not None:
        candidates = [read_manifest(r, name)]
    else:
        found, skipped = scan(r)
        candidates = found[::-1]
        if not candidates:
            if skipped:  # checkpoints exist and none parses: never a silent fresh start
                raise NoRestorableCheckpointError(r.url, skipped)
            raise CheckpointNotFoundError(r.url, None)
    for i, manifest in enumerate(candidates):
        wanted = _check_components(manifest, state, strict, rng)
        try:
            tensors = load_tensors(r, manifest, wanted)  # reads and verifies every object before loading anything
            plan = _prepare(manifest, state, tensors, wanted, strict, rng)  # decodes and checks every component
        except (CorruptObjectError, IncompleteCheckpointError, ManifestError) as err:
            if name is not None:
                raise
            if i == len(candidates) - 1:
                raise NoRestorableCheckpointError(r.url, [*skipped, (manifest.name, str(err))]) from err
            log.warning("restore: skipping %s: %s", manifest.name, err)
            skipped.append((manifest.name, str(err)))
            continue
        result = plan()
        result.skipped = skipped
        if skipped:
            log.warning("restore: fell back to %s; skipped %s", manifest.name, ", ".join(n for n, _ in skipped))
        log.info("restore %s: %s", manifest.name, result.fidelity)
        return result
    raise CheckpointNotFoundError(r.url, name, [n for n, _ in skipped])  # pragma: no cover (the loop returns)


def _check_components(manifest: Manifest, state: Mapping[str, object], strict: bool, rng: bool) -> list[str]:
    saved_comps = manifest.components
    dcp = saved_comps.get("dcp")
    if dcp is not None and "world_size" in dcp.meta:  # written by ckptkit.distributed.save
        raise ManifestError(f"checkpoint {manifest.name!r}", f"a sharded checkpoint written by "
                            f"{dcp.meta['world_size']} rank(s): load it with ckptkit.distributed.load (on any number "
                            "of ranks, or in one process without a process group)")  # fmt: skip
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


def _prepare(
    manifest: Manifest,
    state: Mapping[str, object],
    tensors: dict[str, dict[str, torch.Tensor]],
    wanted: list[str],
    strict: bool,
    rng: bool,
) -> Callable[[], RestoreResult]:
    """Decode and check every component against its live object; return the loads, which change nothing until
    called. A ManifestError names the checkpoint, the component and the field."""
    saved_comps = manifest.components

    def saved(n: str) -> Saved:
        c = saved_comps[n]
        return Saved(c.kind, c.state, tensors[n], c.aliases, c.adapter, c.meta)

    result = RestoreResult(manifest)
    issues = result.fidelity.issues
    names = param_names(state)
    loads: list[Callable[[], object]] = []
    try:
        for n in sorted((n for n in state if n in saved_comps), key=lambda n: _ORDER[saved_comps[n].kind]):
            obj = state[n]
            if isinstance(obj, torch.nn.Module):
                result.reports[n], load = prepare_model(n, obj, saved(n), strict)
            elif isinstance(obj, torch.optim.Optimizer):
                result.reports[n], load = prepare_optimizer(n, obj, saved(n), names, strict)
            elif isinstance(obj, Stateful):
                load = prepare_stateful(n, obj, saved(n))
            else:
                continue
            loads.append(load)
        for n in wanted:
            if saved_comps[n].kind == "value":
                result.values[n] = decode(saved_comps[n].state, tensors[n], f"component {n!r}")
        restore_rng = prepare_rng(saved(RNG)) if rng and RNG in saved_comps else None
    except ManifestError as err:
        raise ManifestError(f"of checkpoint {manifest.name!r}, {err.where}", err.problem) from err
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

    def apply() -> RestoreResult:
        for load in loads:
            load()
        if restore_rng is not None:  # last: nothing a load_state_dict draws shifts the restored streams
            issues.extend(restore_rng())
            issues.extend(_determinism_issues(saved_comps[RNG].meta))
        elif rng:
            issues.append("checkpoint holds no RNG state: random streams (dropout, augmentation) start anew")
        else:
            issues.append("RNG not restored (rng=False)")
        if not any(is_data_loader(obj) for obj in state.values()):
            issues.append("no data-loader state captured: the resumed run does not know which batches it already "
                          "saw (use ckptkit.training.loader.ResumableLoader, LoaderPosition or torchdata's "
                          "StatefulDataLoader)")  # fmt: skip
        return result

    return apply


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


