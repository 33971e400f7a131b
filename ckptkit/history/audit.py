"""A readable report of one model's history: base model, data per segment, hyperparameters, metrics over
steps, transfers and integrity. As text for the terminal, or as one self-contained HTML file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ckptkit.engine.manifests import RepoLike
from ckptkit.history.chain import ChainReport, verify_chain
from ckptkit.history.graph import History, Index, history

__all__ = ["Audit", "audit", "changes", "render_html", "render_text"]


@dataclass
class Audit:
    """Everything the report shows, gathered once."""

    url: str
    history: History
    integrity: ChainReport
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Each metric by position in the history (1 = the oldest checkpoint)."""
    steps: dict[str, list[tuple[int, float, str]]] = field(default_factory=dict)
    """Each metric as (global step, value, repository URL), oldest first: what the page plots."""

    @property
    def head(self) -> Any:
        return self.history.nodes[0].manifest

    def hparams(self) -> tuple[str, dict[str, Any]]:
        """The newest hyperparameters in the history, and which checkpoint recorded them."""
        for n in self.history.nodes:
            if n.manifest.hparams:
                return f"as recorded by {n.manifest.name} ({n.url})", dict(n.manifest.hparams)
        return "none recorded", {}

    def data(self) -> list[tuple[str, Any]]:
        """Every data segment the history trained on, oldest first, with the checkpoint that last recorded it
        (the segment's samples consumed as of that checkpoint)."""
        latest: dict[tuple[str, str], tuple[str, Any]] = {}
        for n in sorted(self.history.nodes, key=lambda n: (n.manifest.created_at, n.manifest.progress.global_step)):
            for d in n.manifest.data:
                latest[(n.url, d.name)] = (f"{n.manifest.name} ({n.url})", d)
        return list(latest.values())


def audit(url: RepoLike, name: str | None = None, *, storage_options: dict[str, Any] | None = None) -> Audit:
    """Gather the history of checkpoint ``name`` (the latest when None), verify it, and collect its metrics.

    Args:
        url: the repository: URL, local path or open :class:`~ckptkit.storage.Repository`.
        storage_options: for the URLs the walk opens (an open Repository keeps its own).
    """
    r = Index(storage_options).add(url)
    h = history(r, name, storage_options=storage_options)
    report = Audit(r.url, h, verify_chain(r, name, storage_options=storage_options))
    # x is the position in the history, oldest first: steps restart in a fine-tune's own repository
    chronological = sorted(h.nodes, key=lambda n: (n.manifest.created_at, n.manifest.progress.global_step))
    for i, n in enumerate(chronological, start=1):
        for k, v in n.manifest.metrics.items():
            if math.isfinite(v):  # NaN and inf cannot be plotted
                report.metrics.setdefault(k, []).append((i, float(v)))
                report.steps.setdefault(k, []).append((n.manifest.progress.global_step, float(v), n.url))
    return report


def _roots(a: Audit) -> list[Any]:
    have_parents = {child for child, parent, _ in a.history.edges if a.history.node(parent) is not None}
    return [n for n in a.history.nodes if n.id not in have_parents]


def changes(m: Any) -> str:
    """What a checkpoint's lineage edges changed, in one line (transfer plans counted, the import source)."""
    parts = []
    for p in m.lineage.parents:
        ch = p.changes
        if p.relation == "transfer" and "plan" in ch:
            counts = ch["plan"].get("counts", {})
            parts.append(f"transfer from {p.name or p.id[:12]}{' (' + p.url + ')' if p.url else ''}: "
                         + ", ".join(f"{v} {k}" for k, v in counts.items()))  # fmt: skip
        elif ch:
            parts.append(", ".join(f"{k}: {json.dumps(v)[:80]}" for k, v in ch.items() if k != "plan"))
    if m.lineage.source:
        parts.append("source: " + json.dumps(m.lineage.source)[:160])
    return "; ".join(parts)


def render_text(a: Audit) -> str:
    """The report for a terminal."""
    m = a.head
    status = "OK" if a.integrity.ok else "PROBLEMS"
    lines = [f"Audit of {m.name} ({m.id[:16]}) in {a.url}",
             f"integrity: {status} ({a.integrity.checked} checkpoints checked)"]  # fmt: skip
    for where, problems in a.integrity.problems.items():
        lines.extend(f"  ! {where}: {p}" for p in problems)
    lines.append("base: " + ", ".join(f"{n.manifest.name} ({n.manifest.lineage.relation})" for n in _roots(a)))
    lines.append("data:")
    lines.extend(f"  {d.name}: {d.samples_consumed} samples consumed, size {d.size}, fingerprint {d.fingerprint}"
                 f"  [{where}]" for where, d in a.data())  # fmt: skip
    hp_from, hparams = a.hparams()
    lines.append(f"hyperparameters ({hp_from}): {json.dumps(hparams)}")
    lines.append("history (newest first):")
    for n in a.history.nodes:
        nm = n.manifest
        lines.append(f"  {nm.name:24s} {nm.lineage.relation:9s} step {nm.progress.global_step:<7d} "
                     + " ".join(f"{k}={v:.4g}" for k, v in nm.metrics.items()))  # fmt: skip
        ch = changes(nm)
        if ch and nm.lineage.relation != "train":
            lines.append(f"      {ch}")
    return "\n".join(lines)


def render_html(a: Audit) -> str:
    """The report as one self-contained HTML page (:func:`ckptkit.history.page.page`: the lineage drawn inline,
    integrity per checkpoint, data per training segment, metrics against steps, plain training folded)."""
    from ckptkit.history.page import page

    return page(a)
