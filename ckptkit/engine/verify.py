"""Verify checkpoints end to end, and collect garbage. Internal engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptkit.engine.manifests import read_manifest, reference_problems
from ckptkit.engine.tensors import object_contents, placement_problem
from ckptkit.errors import CheckpointNotFoundError, ManifestError
from ckptkit.hashing import check_name
from ckptkit.storage import Repository

__all__ = ["VerifyReport", "verify_repository"]


@dataclass
class VerifyReport:
    """Result of :func:`~ckptkit.verify` for one checkpoint; ``problems`` is empty when it is intact.

    ``files`` names each damaged file, once, in the order found: the manifest
    (``<repo>/checkpoints/<name>.json``) when it is missing, cannot be read or parsed, was edited after its commit
    or points nowhere, and each object that is missing, corrupt or lacks a tensor the manifest places in it.
    """

    name: str
    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_repository(r: Repository, name: str | None = None) -> list[VerifyReport]:
    """Check checkpoint ``name`` (every checkpoint when ``None``) end to end, everything a restore relies on: the
    manifest parses, matches its id and is stored under its own name; every tensor sits in an object the manifest
    lists; every alias resolves; every object exists, hashes to its name and holds each tensor placed in it
    under its key with the declared dtype and shape."""
    names = [name] if name is not None else r.list()
    if name is not None:
        check_name(name)
    reports = []
    # (hash, size) -> what the object holds, or why it cannot be read: each object is read once, and checked
    # against each manifest's own tensor entries
    read: dict[tuple[str, int], dict[str, tuple[str, list[int]]] | str] = {}
    for n in names:
        rep = VerifyReport(n)
        reports.append(rep)
        manifest_file = f"{r.url}/checkpoints/{n}.json"  # as read_manifest names it in its errors
        try:
            manifest = read_manifest(r, n)
        except (ManifestError, CheckpointNotFoundError) as err:
            rep.problems.append(str(err))
            rep.files.append(manifest_file)
            continue
        dangling = reference_problems(manifest)
        rep.problems.extend(dangling)
        if dangling:
            rep.files.append(manifest_file)
        for h, info in manifest.objects.items():
            rep.objects += 1
            rep.bytes += info.size
            if (h, info.size) not in read:
                read[(h, info.size)] = object_contents(r, h, info.size)
            contents = read[(h, info.size)]
            problem = contents if isinstance(contents, str) else placement_problem(r, manifest, h, contents)
            if problem:
                rep.problems.append(problem)
                if r.object_path(h) not in rep.files:
                    rep.files.append(r.object_path(h))
    return reports
