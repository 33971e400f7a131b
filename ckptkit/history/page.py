"""The audit report as one self-contained HTML page, the page a reviewer reads: the lineage DAG drawn inline
(Graphviz SVG, relations labelled and coloured, runs of plain training folded into one node), integrity per
checkpoint, the data of each training segment, metrics against global steps on labelled axes, hyperparameters,
and the history with plain training folded. No scripts and no external files."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptkit.history.graph import History, Node

if TYPE_CHECKING:
    from ckptkit.history.audit import Audit

__all__ = [
    "BADGE_COLORS",
    "FOLD",
    "PAGE_CSS",
    "PALETTE",
    "RELATION_COLORS",
    "DotNode",
    "Run",
    "chain_segments",
    "chart",
    "dot_source",
    "dot_svg",
    "fold_chains",
    "fold_runs",
    "legend",
    "lineage_dot",
    "lineage_svg",
    "page",
    "repo_short",
    "run_label",
    "segments",
]

FOLD = 3
"""Runs of more plain ``train`` checkpoints than this are folded into one node / row."""

RELATION_COLORS = {
    "init": "#e5e7eb", "train": "#ffffff", "resume": "#bfdbfe", "continue": "#bbf7d0", "transfer": "#fde68a",
    "import": "#fbcfe8", "folded": "#f3f4f6",
}  # fmt: skip
"""The fill of a lineage node, by the relation that made its checkpoint (``folded``: a run of plain training)."""

BADGE_COLORS = {"verified": "#d1fadf", "problems": "#fecaca", "archived": "#e0e7ff", "removed": "#fed7aa"}
"""The fill of an integrity badge: verified, problems found (objects missing), manifest only (archived by
retention), manifest gone from its repository (what the catalog still remembers)."""
_OK, _BAD, _ARCHIVED = BADGE_COLORS["verified"], BADGE_COLORS["problems"], BADGE_COLORS["archived"]
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]
"""Line colours of the metric charts, one per metric."""

PAGE_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f0f0f0; } .ok { color: #1a7f37; font-weight: bold; } .bad { color: #b00020; font-weight: bold; }
code { font-size: 90%; } .badge, .rel { padding: 1px 6px; border-radius: 4px; border: 1px solid #9ca3af;
  white-space: nowrap; }
tr.folded td { background: #fafafa; } details summary { cursor: pointer; } .graph svg { max-width: 100%; }
"""
"""The style sheet of the audit and catalog pages (inlined: the pages load nothing)."""


@dataclass
class Run:
    """Consecutive plain ``train`` checkpoints of one chain (newest first), shown as one node or row."""

    nodes: list[Node]

    @property
    def steps(self) -> tuple[int, int]:
        return self.nodes[-1].manifest.progress.global_step, self.nodes[0].manifest.progress.global_step

    @property
    def label(self) -> str:
        return run_label(len(self.nodes), *self.steps)


def run_label(count: int, lo: int, hi: int) -> str:
    """The label of a folded run: ``"5 train checkpoints, steps 2..6"``."""
    return f"{count} train checkpoints, steps {lo}..{hi}"


def fold_chains(order: Sequence[str], relation: Mapping[str, str], edges: Iterable[tuple[str, str, str]],
                fold: int = FOLD) -> list[list[str]]:  # fmt: skip
    """Runs of more than ``fold`` checkpoints that are plain training in a linear chain (made by ``train`` from
    one parent, and the only parent of one child by ``train``), each as its ids newest first.

    Args:
        order: the checkpoints' ids, newest first (a run starts at its newest checkpoint).
        relation: the relation that made each checkpoint, by id: the checkpoints a run may hold.
        edges: (child id, parent id, relation), parents outside ``relation`` included.
    """
    parents: dict[str, list[tuple[str, str]]] = {}
    children: dict[str, list[tuple[str, str]]] = {}
    for c, p, r in edges:
        parents.setdefault(c, []).append((p, r))
        children.setdefault(p, []).append((c, r))

    def interior(i: str) -> bool:
        ps, cs = parents.get(i, []), children.get(i, [])
        return relation.get(i) == "train" and [r for _, r in ps] == ["train"] and [r for _, r in cs] == ["train"]

    out: list[list[str]] = []
    seen: set[str] = set()
    for i in order:
        if i in seen or not interior(i):
            continue
        run = [i]
        seen.add(i)
        nxt = parents[i][0][0]
        while nxt in relation and nxt not in seen and interior(nxt):
            run.append(nxt)
            seen.add(nxt)
            nxt = parents[nxt][0][0]
        if len(run) > fold:
            out.append(run)
    return out


def fold_runs(h: History, fold: int = FOLD) -> dict[str, Run]:
    """Runs of more than ``fold`` checkpoints of plain training (:func:`fold_chains`), by the id of each
    checkpoint they hold."""
    nodes = {n.id: n for n in h.nodes}
    out: dict[str, Run] = {}
    for ids in fold_chains([n.id for n in h.nodes], {n.id: n.manifest.lineage.relation for n in h.nodes}, h.edges,
                           fold):  # fmt: skip
        folded = Run([nodes[i] for i in ids])
        out.update({i: folded for i in ids})
    return out


def _dot_esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', "'")


def repo_short(url: str) -> str:
    """A repository's last path component, as the pages label it."""
    return url.rstrip("/").rsplit("/", 1)[-1] or url


@dataclass(frozen=True)
class DotNode:
    """One box of a lineage drawing: its DOT key, label lines (plain text: escaped when drawn), fill, the
    repository whose cluster holds it (None: outside every cluster) and whether it is drawn dashed."""

    key: str
    lines: Sequence[str]
    fill: str
    cluster: str | None
    dashed: bool = False
    bold: bool = False


def dot_source(nodes: Sequence[DotNode], edges: Iterable[tuple[str, str, str]]) -> str:
    """A lineage drawing as Graphviz DOT: the nodes (one dashed cluster per repository, labelled with its last
    path component), and ``edges`` (child key, parent key, relation) labelled with their relation."""
    lines = ["digraph lineage {", "  rankdir=BT; nodesep=0.3; ranksep=0.35;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, color="#374151"];',
             '  edge [fontname="Helvetica", fontsize=9, color="#6b7280"];']  # fmt: skip
    by_repo: dict[str, list[str]] = {}
    outside: list[str] = []
    for n in nodes:
        label = "\\n".join(_dot_esc(x) for x in n.lines)
        style = "rounded,filled,dashed" if n.dashed else "rounded,filled"
        pen = ", penwidth=2.5" if n.bold else ""
        line = f'    "{_dot_esc(n.key)}" [label="{label}", fillcolor="{n.fill}", style="{style}"{pen}];'
        (outside if n.cluster is None else by_repo.setdefault(n.cluster, [])).append(line)
    for i, (url, members) in enumerate(by_repo.items()):
        lines.append(f'  subgraph cluster_{i} {{ label="{_dot_esc(repo_short(url))}"; fontname="Helvetica"; '
                     'fontsize=10; style="dashed"; color="#9ca3af";')  # fmt: skip
        lines.extend(members)
        lines.append("  }")
    lines.extend(x[2:] for x in outside)
    for c, p, r in sorted(set(edges)):
        lines.append(f'  "{_dot_esc(c)}" -> "{_dot_esc(p)}" [label="{_dot_esc(r)}"];')
    lines.append("}")
    return "\n".join(lines)


def dot_svg(source: str) -> str | None:
    """DOT ``source`` rendered by Graphviz's ``dot`` as inline SVG (text escaped by Graphviz), or None when
    ``dot`` is not installed or fails."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    try:
        out = subprocess.run([dot, "-Tsvg"], input=source.encode(), capture_output=True, check=True,
                             timeout=60).stdout.decode()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    start = out.find("<svg")
    return out[start:] if start >= 0 else None


def lineage_dot(h: History, fold: int = FOLD) -> str:
    """The lineage DAG as Graphviz DOT for the page: nodes coloured by relation (:data:`RELATION_COLORS`), edges
    labelled with it, runs of plain training folded, one cluster per repository.

    Example:
        >>> from ckptkit.history.graph import History
        >>> lineage_dot(History()).splitlines()[0]
        'digraph lineage {'
    """
    runs = fold_runs(h, fold)
    key = {n.id: (f"run{id(runs[n.id])}" if n.id in runs else n.id[:12]) for n in h.nodes}
    nodes: list[DotNode] = []
    done: set[str] = set()
    for n in h.nodes:
        k = key[n.id]
        if k in done:
            continue
        done.add(k)
        if n.id in runs:
            nodes.append(DotNode(k, [runs[n.id].label], RELATION_COLORS["folded"], n.url, dashed=True))
        else:
            m = n.manifest
            metrics = " ".join(f"{a}={v:.3g}" for a, v in list(m.metrics.items())[:2])
            parts = [m.name, f"{m.lineage.relation}, step {m.progress.global_step}", *([metrics] if metrics else [])]
            nodes.append(DotNode(k, parts, RELATION_COLORS.get(m.lineage.relation, "#ffffff"), n.url,
                                 dashed=n.archived))  # fmt: skip
    edges: set[tuple[str, str, str]] = set()
    for c, p, r in h.edges:
        if c not in key:
            continue
        if p not in key:
            nodes.append(DotNode(f"missing{p[:12]}", [p[:12], "(not found)"], "#fecaca", None))
            edges.add((key[c], f"missing{p[:12]}", r))
        elif key[c] != key[p]:
            edges.add((key[c], key[p], r))
    return dot_source(nodes, edges)


def lineage_svg(h: History, fold: int = FOLD) -> str | None:
    """:func:`lineage_dot` rendered by Graphviz's ``dot`` as inline SVG, or None when ``dot`` is not installed."""
    return dot_svg(lineage_dot(h, fold))


def legend() -> str:
    """The relation colours, as the pages show them above the lineage."""
    return " ".join(f'<span class="rel" style="background:{c}">{k}</span>' for k, c in RELATION_COLORS.items())


def chain_segments(order: Sequence[str], relation: Mapping[str, str],
                   edges: Iterable[tuple[str, str, str]]) -> list[tuple[str, list[str]]]:  # fmt: skip
    """Training segments, oldest first, as (head id, member ids): each starts at a checkpoint made by something
    other than plain training (init, resume, continue, transfer, import), or whose ``train`` parent is not in
    ``order``, and holds the ``train`` checkpoints that follow it on its chain.

    Args:
        order: ids, oldest first.
        relation: the relation that made each checkpoint, by id.
        edges: (child id, parent id, relation).
    """
    parent = {c: p for c, p, r in edges if r == "train"}
    start_of: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for i in order:
        p = parent.get(i) if relation.get(i) == "train" else None
        head = start_of.get(p) if p is not None else None
        if head is None:
            head = i
            out[i] = []
        else:
            out[head].append(i)
        start_of[i] = head
    return list(out.items())


def segments(a: Audit) -> list[tuple[Node, list[Node]]]:
    """Training segments of an audit, oldest first (:func:`chain_segments`)."""
    order = sorted(a.history.nodes, key=lambda n: (n.manifest.created_at, n.manifest.progress.global_step))
    nodes = {n.id: n for n in order}
    segs = chain_segments([n.id for n in order], {n.id: n.manifest.lineage.relation for n in order}, a.history.edges)
    return [(nodes[h], [nodes[m] for m in members]) for h, members in segs]


def _axis_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def chart(name: str, pts: Sequence[tuple[int, float, str]], color: str, width: int = 620, height: int = 220) -> str:
    """One metric against the global step as inline SVG: labelled axes with tick values, one line per series
    (the third item of each point: a repository URL, labelled with its last path component)."""
    e = html.escape
    left, right, top, bottom = 64, 16, 24, 44
    xs = [s for s, _, _ in pts]
    ys = [v for _, v, _ in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(s: float) -> float:
        return left + (s - x0) / ((x1 - x0) or 1) * (width - left - right)

    def sy(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{e(name)} against global step"><rect width="100%" height="100%" fill="#fff"/>',
           f'<text x="{left}" y="14" font-size="12" font-weight="bold">{e(name)}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
           f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">'
           "global step</text>",
           f'<text x="12" y="{(top + height - bottom) / 2:.0f}" font-size="11" text-anchor="middle" '
           f'transform="rotate(-90 12 {(top + height - bottom) / 2:.0f})">{e(name)}</text>']  # fmt: skip
    for t in sorted({float(round(x)) for x in _axis_ticks(x0, x1)}):  # steps are integers: no tick twice
        out.append(f'<line x1="{sx(t):.1f}" y1="{height - bottom}" x2="{sx(t):.1f}" y2="{height - bottom + 4}" '
                   f'stroke="#444"/><text x="{sx(t):.1f}" y="{height - bottom + 16}" font-size="10" '
                   f'text-anchor="middle">{t:.0f}</text>')  # fmt: skip
    for t in _axis_ticks(y0, y1):
        out.append(f'<line x1="{left - 4}" y1="{sy(t):.1f}" x2="{left}" y2="{sy(t):.1f}" stroke="#444"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 3:.1f}" font-size="10" text-anchor="end">{t:.3g}</text>')
    by_repo: dict[str, list[tuple[int, float]]] = {}
    for s, v, url in pts:
        by_repo.setdefault(url, []).append((s, v))
    dash = ["", ' stroke-dasharray="5,3"', ' stroke-dasharray="2,2"']
    dash_name = ["solid", "dashed", "dotted"]
    for i, (url, line) in enumerate(by_repo.items()):
        line.sort()
        path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in line)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash[i % 3]} points="{path}"/>')
        out.extend(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{color}"/>' for s, v in line)
        if len(by_repo) > 1:
            out.append(f'<text x="{width - right}" y="{top + 12 * (i + 1)}" font-size="10" text-anchor="end" '
                       f'fill="{color}">{dash_name[i % 3]}: {e(repo_short(url))}</text>')
    out.append("</svg>")
    return "".join(out)


def _badge(a: Audit, n: Node) -> str:
    problems = a.integrity.problems.get(f"{n.url} {n.manifest.name}", [])
    if problems:
        return (f'<span class="badge" style="background:{_BAD}" title="{html.escape("; ".join(problems))}">'
                f"{len(problems)} problem(s)</span>")  # fmt: skip
    if n.archived:
        return f'<span class="badge" style="background:{_ARCHIVED}">manifest verified, objects pruned</span>'
    return f'<span class="badge" style="background:{_OK}">verified</span>'


def _row(a: Audit, n: Node, changes: str) -> str:
    e = html.escape
    nm = n.manifest
    metrics = " ".join(f"{k}={v:.4g}" for k, v in nm.metrics.items())
    fill = RELATION_COLORS.get(nm.lineage.relation, "#fff")
    return (f'<tr><td>{e(nm.name)}</td><td><span class="rel" style="background:{fill}">{e(nm.lineage.relation)}'
            f"</span></td><td>{nm.progress.global_step}</td><td>{e(nm.created_at.strftime('%Y-%m-%d %H:%M:%S'))}"
            f"</td><td>{e(metrics)}</td><td>{e(changes)}</td><td>{_badge(a, n)}</td><td><code>{nm.id[:12]}</code>"
            f"</td><td>{e(repo_short(n.url))}</td></tr>")  # fmt: skip


def _history_rows(a: Audit, changes: Any, fold: int) -> str:
    runs = fold_runs(a.history, fold)
    out: list[str] = []
    shown: set[int] = set()
    for n in a.history.nodes:
        run = runs.get(n.id)
        if run is None:
            out.append(_row(a, n, changes(n.manifest)))
        elif id(run) not in shown:
            shown.add(id(run))
            ok = sum(1 for m in run.nodes if not a.integrity.problems.get(f"{m.url} {m.manifest.name}"))
            inner = "".join(_row(a, m, "") for m in run.nodes)
            out.append(f'<tr class="folded"><td colspan="9"><details><summary>{html.escape(run.label)} '
                       f"({ok} of {len(run.nodes)} intact)</summary><table>{inner}</table></details></td></tr>")
    return "".join(out)


def page(a: Audit, fold: int = FOLD) -> str:
    """The audit page of ``a`` (see the module docstring)."""
    from ckptkit.history.audit import changes

    e = html.escape
    m = a.head
    ok = a.integrity.ok
    svg = lineage_svg(a.history, fold)
    if svg is None:
        from ckptkit.history.render import render

        graph = (f"<p>(Graphviz's <code>dot</code> is not installed: the lineage as text)</p><pre>"
                 f"{e(render(a.history, 'text'))}</pre>")  # fmt: skip
    else:
        graph = f'<div class="graph">{svg}</div>'
    seg_rows = []
    for i, (head, members) in enumerate(segments(a), start=1):
        last = (members or [head])[-1]
        lo, hi = head.manifest.progress.global_step, last.manifest.progress.global_step
        data = "; ".join(f"{d.name}: {d.samples_consumed} samples" + (f" (fingerprint {d.fingerprint[:16]})"
                         if d.fingerprint else "") for d in last.manifest.data) or "none recorded"  # fmt: skip
        parents = ", ".join(p.name or p.id[:12] for p in head.manifest.lineage.parents) or "-"
        seg_rows.append(f"<tr><td>{i}</td><td>{e(head.manifest.lineage.relation)} from {e(parents)}</td>"
                        f"<td>{e(repo_short(head.url))}</td><td>{lo}..{hi}</td><td>{1 + len(members)}</td>"
                        f"<td>{e(data)}</td></tr>")  # fmt: skip
    charts = "".join(chart(k, pts, PALETTE[i % len(PALETTE)]) for i, (k, pts) in enumerate(a.steps.items()))
    data_rows = "".join(f"<tr><td>{e(d.name)}</td><td>{e(d.uri or '')}</td><td><code>{e(d.fingerprint or '')}</code>"
                        f"</td><td>{d.size if d.size is not None else ''}</td><td>{d.samples_consumed}</td>"
                        f"<td>{e(where)}</td></tr>" for where, d in a.data())  # fmt: skip
    hp_from, hparams = a.hparams()
    hp = "".join(f"<tr><td>{e(k)}</td><td><code>{e(json.dumps(v))}</code></td></tr>" for k, v in hparams.items())
    problems = "".join(f"<li>{e(w)}: {e(p)}</li>" for w, ps in a.integrity.problems.items() for p in ps)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Audit of {e(m.name)}</title>
<style>{PAGE_CSS}</style></head><body>
<h1>Audit of {e(m.name)}</h1>
<p>Repository <code>{e(a.url)}</code>, checkpoint id <code>{e(m.id)}</code>, step {m.progress.global_step},
epoch {m.progress.epoch}, {m.progress.samples_seen} samples seen.</p>
<p>Integrity: <span class="{'ok' if ok else 'bad'}">{'verified' if ok else 'PROBLEMS FOUND'}</span>
({a.integrity.checked} checkpoints in the chain checked: manifests against their ids, objects against their hashes)</p>
{'<ul>' + problems + '</ul>' if problems else ''}
<h2>Lineage</h2><p>{legend()}</p>{graph}
<h2>Training segments</h2><table><tr><th>#</th><th>started by</th><th>repository</th><th>steps</th>
<th>checkpoints</th><th>data (samples consumed)</th></tr>{''.join(seg_rows)}</table>
<h2>Metrics against global step</h2>{charts or '<p>No metrics recorded.</p>'}
<h2>Data</h2><table><tr><th>segment</th><th>uri</th><th>fingerprint</th><th>size</th><th>samples consumed</th>
<th>recorded by</th></tr>{data_rows}</table>
<h2>Hyperparameters</h2><p>{e(hp_from)}</p><table><tr><th>name</th><th>value</th></tr>{hp}</table>
<h2>History (newest first)</h2>
<table><tr><th>checkpoint</th><th>relation</th><th>step</th><th>created</th><th>metrics</th><th>changes</th>
<th>integrity</th><th>id</th><th>repository</th></tr>
{_history_rows(a, changes, fold)}</table>
</body></html>
"""
