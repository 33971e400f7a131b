"""A readable report of one model's history: base model, data per segment, hyperparameters, metrics over
steps, transfers and integrity. As text for the terminal, or as one self-contained HTML file."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ckptkit.engine.manifests import RepoLike
from ckptkit.history.chain import ChainReport, verify_chain
from ckptkit.history.graph import History, Index, history

__all__ = ["Audit", "audit", "render_html", "render_text"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]


@dataclass
class Audit:
    """Everything the report shows, gathered once."""

    url: str
    history: History
    integrity: ChainReport
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

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
    return report


def _roots(a: Audit) -> list[Any]:
    have_parents = {child for child, parent, _ in a.history.edges if a.history.node(parent) is not None}
    return [n for n in a.history.nodes if n.id not in have_parents]


def _changes(m: Any) -> str:
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
        ch = _changes(nm)
        if ch and nm.lineage.relation != "train":
            lines.append(f"      {ch}")
    return "\n".join(lines)


def _plot(series: dict[str, list[tuple[int, float]]], width: int = 640, height: int = 260) -> str:
    """An SVG line chart of each metric over global steps (each metric scaled to its own range)."""
    if not series:
        return "<p>No metrics recorded.</p>"
    steps = [s for pts in series.values() for s, _ in pts]
    x0, x1 = min(steps), max(steps)
    pad = 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="metrics over steps"><rect width="100%" height="100%" fill="#fff"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#444"/>',
           f'<line x1="{pad}" y1="10" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
           f'<text x="{pad}" y="{height - 12}" font-size="11">checkpoint {x0} (oldest)</text>',
           f'<text x="{width - 150}" y="{height - 12}" font-size="11">checkpoint {x1} (newest)</text>']  # fmt: skip
    for i, (name, pts) in enumerate(series.items()):
        ys = [v for _, v in pts]
        y0, y1 = min(ys), max(ys)
        color = _PALETTE[i % len(_PALETTE)]

        def sx(s: int) -> float:
            return pad + (s - x0) / ((x1 - x0) or 1) * (width - pad - 20)

        def sy(v: float, y0: float = y0, y1: float = y1) -> float:
            return 10 + (1 - (v - y0) / ((y1 - y0) or 1)) * (height - pad - 20)

        path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        out.extend(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="{color}"/>' for s, v in pts)
        out.append(f'<text x="{pad + 8}" y="{24 + 14 * i}" font-size="12" fill="{color}">'
                   f"{html.escape(name)}: {y0:.4g} .. {y1:.4g}</text>")  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def render_html(a: Audit) -> str:
    """The report as one self-contained HTML page (inline SVG plot, no scripts, no external files)."""
    m = a.head
    e = html.escape
    ok = a.integrity.ok
    rows = []
    for n in a.history.nodes:
        nm = n.manifest
        metrics = " ".join(f"{k}={v:.4g}" for k, v in nm.metrics.items())
        rows.append(f"<tr><td>{e(nm.name)}</td><td>{e(nm.lineage.relation)}</td><td>{nm.progress.global_step}</td>"
                    f"<td>{e(nm.created_at.strftime('%Y-%m-%d %H:%M:%S'))}</td><td>{e(metrics)}</td>"
                    f"<td>{e(_changes(nm))}</td><td><code>{nm.id[:12]}</code>{' (archived)' if n.archived else ''}"
                    "</td></tr>")  # fmt: skip
    problems = "".join(f"<li>{e(w)}: {e(p)}</li>" for w, ps in a.integrity.problems.items() for p in ps)
    data = "".join(f"<tr><td>{e(d.name)}</td><td>{e(d.uri or '')}</td><td><code>{e(d.fingerprint or '')}</code></td>"
                   f"<td>{d.size if d.size is not None else ''}</td><td>{d.samples_consumed}</td><td>{e(where)}</td>"
                   "</tr>" for where, d in a.data())  # fmt: skip
    hp_from, hparams = a.hparams()
    hp = "".join(f"<tr><td>{e(k)}</td><td><code>{e(json.dumps(v))}</code></td></tr>" for k, v in hparams.items())
    base = ", ".join(e(f"{n.manifest.name} ({n.manifest.lineage.relation})") for n in _roots(a))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Audit of {e(m.name)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f0f0f0; }} .ok {{ color: #1a7f37; font-weight: bold; }} .bad {{ color: #b00020; font-weight: bold; }}
code {{ font-size: 90%; }}
</style></head><body>
<h1>Audit of {e(m.name)}</h1>
<p>Repository <code>{e(a.url)}</code>, checkpoint id <code>{e(m.id)}</code>, step {m.progress.global_step},
epoch {m.progress.epoch}, {m.progress.samples_seen} samples seen.</p>
<p>Integrity: <span class="{'ok' if ok else 'bad'}">{'verified' if ok else 'PROBLEMS FOUND'}</span>
({a.integrity.checked} checkpoints in the chain checked: manifests against their ids, objects against their hashes)</p>
{'<ul>' + problems + '</ul>' if problems else ''}
<h2>Base</h2><p>{base}</p>
<h2>Metrics along the history</h2>{_plot(a.metrics)}
<h2>Data</h2><table><tr><th>segment</th><th>uri</th><th>fingerprint</th><th>size</th><th>samples consumed</th>
<th>recorded by</th></tr>{data}</table>
<h2>Hyperparameters</h2><p>{e(hp_from)}</p><table><tr><th>name</th><th>value</th></tr>{hp}</table>
<h2>History (newest first)</h2>
<table><tr><th>checkpoint</th><th>relation</th><th>step</th><th>created</th><th>metrics</th><th>changes</th><th>id</th></tr>
{''.join(rows)}</table>
</body></html>
"""
