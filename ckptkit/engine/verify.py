"""Verify checkpoints end to end, and collect garbage. Internal engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptkit.engine.manifests import read_manifest
from ckptkit.engine.tensors import check_object
from ckptkit.errors import CheckpointNotFoundError, ManifestError
from ckptkit.hashing import check_name
from ckptkit.storage import Repository

__all__ = ["VerifyReport", "verify_repository"]


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


def verify_repository(r: Repository, name: str | None = None) -> list[VerifyReport]:
    """Check checkpoint ``name`` (every checkpoint when ``None``) end to end: the manifest parses and matches
    its id, every object exists and hashes to its name, every tensor is where the manifest says."""
    names = [name] if name is not None else r.list()
    if name is not None:
        check_name(name)
    reports = []
    checked: dict[str, str | None] = {}  # object hash -> problem (None when fine), shared across checkpoints
    for n in names:
        rep = VerifyReport(n)
        reports.append(rep)
        try:
            manifest = read_manifest(r, n)
        except (ManifestError, CheckpointNotFoundError) as err:
            rep.problems.append(str(err))
            continue
        for h, info in manifest.objects.items():
            rep.objects += 1
            rep.bytes += info.size
            if h not in checked:
                checked[h] = check_object(r, manifest, h, info.size)
            if checked[h]:
                rep.problems.append(str(checked[h]))
    return reports
