"""A catalog query's result as one self-contained HTML page, drawn the way the audit page is
(:mod:`ckptkit.history.page`): the lineage DAG of the checkpoints found, across repositories (Graphviz SVG,
nodes coloured by relation, edges labelled, runs of plain training folded), a table of the checkpoints with
their status in the catalog as an integrity badge, the data each training segment saw, and metrics against
global steps on labelled axes (one line per repository). No scripts and no external files.

Everything shown comes from storage (names, URLs, dataset names, metric names) and is escaped.

Example::

    from ckptkit.catalog import Catalog
    from ckptkit.history.catalog_page import page

    with Catalog() as cat:
        html = page(cat.where_data("imagenet-train"), "checkpoints whose weights saw imagenet-train")
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from ckptkit.catalog import CheckpointRecord
from ckptkit.history.page import (
    BADGE_COLORS,
    FOLD,
    PAGE_CSS,
    PALETTE,
    RELATION_COLORS,
    DotNode,
    chain_segments,
    chart,
    dot_source,
    dot_svg,
    fold_chains,
    legend,
    repo_short,
    run_label,
)

__all__ = ["badge", "lineage_dot", "page"]

_e = html.escape


def _newest_first(records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
    return sorted(records, key=lambda r: (r.created_at, r.global_step, r.id), reverse=True)


def _edges(records: Sequence[CheckpointRecord]) -> list[tuple[str, str, str]]:
    return [(r.id, p, rel) for r in records for p, rel in r.parents]


def _runs(records: Sequence[CheckpointRecord], fold: int) -> dict[str, list[CheckpointRecord]]:
    """Folded runs of plain training, each newest first, by the id of every checkpoint it holds."""
    by_id = {r.id: r for r in records}
    order = [r.id for r in _newest_first(records)]
    out: dict[str, list[CheckpointRecord]] = {}
    for ids in fold_chains(order, {r.id: r.relation for r in records}, _edges(records), fold):
        run = [by_id[i] for i in ids]
        out.update({i: run for i in ids})
    return out


def _label(run: Sequence[CheckpointRecord]) -> str:
    return run_label(len(run), run[-1].global_step, run[0].global_step)


def _metrics(r: CheckpointRecord, limit: int | None = None, digits: int = 4) -> str:
    items = list(r.metrics.items())[:limit]
    return " ".join(f"{k}={'nan' if v is None else f'{v:.{digits}g}'}" for k, v in items)


_STATUS_NOTE = {"incomplete": "objects missing", "archived": "archived", "removed": "removed"}


def lineage_dot(records: Sequence[CheckpointRecord], fold: int = FOLD, root: str | None = None) -> str:
    """The lineage DAG of ``records`` as Graphviz DOT: one box per checkpoint coloured by the relation that made
    it, one dashed cluster per repository, edges between the records labelled with their relation, runs of more
    than ``fold`` plain ``train`` checkpoints as one box, archived and removed checkpoints dashed, and ``root``
    (the checkpoint a query started at) drawn bold. Parents outside ``records`` are not drawn."""
    runs = _runs(records, fold)
    key = {r.id: (f"run-{runs[r.id][0].id[:12]}" if r.id in runs else r.id) for r in records}
    nodes: list[DotNode] = []
    done: set[str] = set()
    for r in _newest_first(records):
        k = key[r.id]
        if k in done:
            continue
        done.add(k)
        cluster = r.repo or None
        if r.id in runs:
            nodes.append(DotNode(k, [_label(runs[r.id])], RELATION_COLORS["folded"], cluster, dashed=True))
            continue
        metrics = _metrics(r, limit=2, digits=3)
        status = _STATUS_NOTE.get(r.status)
        lines = [r.name, f"{r.relation}, step {r.global_step}", *([metrics] if metrics else []),
                 *([f"({status})"] if status else [])]  # fmt: skip
        nodes.append(DotNode(k, lines, RELATION_COLORS.get(r.relation, "#ffffff"), cluster,
                             dashed=r.status in ("archived", "removed"), bold=r.id == root))  # fmt: skip
    edges = {(key[c], key[p], rel) for c, p, rel in _edges(records) if p in key and key[c] != key[p]}
    return dot_source(nodes, edges)


def badge(r: CheckpointRecord) -> str:
    """The integrity badge of a record, from its status in the catalog (every indexed manifest was verified
    against its id and its parents' ids; the status says what the repository's last listing held)."""
    if r.status == "committed":
        color, text = BADGE_COLORS["verified"], "verified"
    elif r.status == "incomplete":
        missing = next((loc.objects_missing for loc in r.locations if loc.status == "incomplete"), 0)
        color, text = BADGE_COLORS["problems"], f"{missing} object(s) missing"
    elif r.status == "archived":
        color, text = BADGE_COLORS["archived"], "archived: objects pruned"
    else:
        color, text = BADGE_COLORS["removed"], "removed from the repository"
    where = "; ".join(f"{loc.status} as {loc.name} in {loc.repo}" for loc in r.locations)
    return f'<span class="badge" style="background:{color}" title="{_e(where)}">{_e(text)}</span>'


def _parents(r: CheckpointRecord, names: dict[str, CheckpointRecord]) -> str:
    out = []
    for pid, rel in r.parents:
        p = names.get(pid)
        if p is None:
            who = f"{pid[:12]} (not in this result)"
        else:
            who = p.name if p.repo == r.repo else f"{p.name} ({repo_short(p.repo)})"
        out.append(f"{rel} from {who}")
    return "; ".join(out) or "-"


def _row(r: CheckpointRecord, names: dict[str, CheckpointRecord], depth: bool) -> str:
    fill = RELATION_COLORS.get(r.relation, "#fff")
    copies = f" (+{len(r.locations) - 1} more)" if len(r.locations) > 1 else ""
    cells = [_e(repo_short(r.repo)) + copies, _e(r.name),
             f'<span class="rel" style="background:{fill}">{_e(r.relation)}</span>', str(r.global_step),
             _e(r.created_at.strftime("%Y-%m-%d %H:%M")), badge(r), _e(_metrics(r)), _e(", ".join(r.data)),
             _e(_parents(r, names)), *([_e("" if r.depth is None else str(r.depth))] if depth else []),
             f"<code>{_e(r.id[:12])}</code>"]  # fmt: skip
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


_HEAD = ["repository", "checkpoint", "relation", "step", "created", "integrity", "metrics", "data seen", "parents"]


def _table(records: Sequence[CheckpointRecord], fold: int, depth: bool) -> str:
    runs = _runs(records, fold)
    names = {r.id: r for r in records}
    cols = [*_HEAD, *(["depth"] if depth else []), "id"]
    rows: list[str] = []
    shown: set[str] = set()
    for r in _newest_first(records):
        run = runs.get(r.id)
        if run is None:
            rows.append(_row(r, names, depth))
        elif run[0].id not in shown:
            shown.add(run[0].id)
            ok = sum(1 for m in run if m.status in ("committed", "archived"))
            inner = "".join(_row(m, names, depth) for m in run)
            rows.append(f'<tr class="folded"><td colspan="{len(cols)}"><details><summary>{_e(_label(run))} in '
                        f"{_e(repo_short(r.repo))} ({ok} of {len(run)} intact)</summary><table>{inner}</table>"
                        "</details></td></tr>")  # fmt: skip
    head = "".join(f"<th>{c}</th>" for c in cols)
    return f'<table class="checkpoints"><tr>{head}</tr>{"".join(rows)}</table>'


def _segments(records: Sequence[CheckpointRecord]) -> str:
    order = sorted(records, key=lambda r: (r.created_at, r.global_step, r.id))
    by_id = {r.id: r for r in order}
    rows = []
    for i, (hid, members) in enumerate(chain_segments([r.id for r in order], {r.id: r.relation for r in order},
                                                      _edges(order)), start=1):  # fmt: skip
        head = by_id[hid]
        last = by_id[members[-1]] if members else head
        rows.append(f"<tr><td>{i}</td><td>{_e(_parents(head, by_id) if head.parents else head.relation)}</td>"
                    f"<td>{_e(repo_short(head.repo))}</td><td>{head.global_step}..{last.global_step}</td>"
                    f"<td>{1 + len(members)}</td><td>{_e(', '.join(last.data) or 'none recorded')}</td></tr>")
    return ("<table><tr><th>#</th><th>started by</th><th>repository</th><th>steps</th><th>checkpoints</th>"
            f"<th>data seen (at its last checkpoint)</th></tr>{''.join(rows)}</table>")  # fmt: skip


def _data(records: Sequence[CheckpointRecord]) -> str:
    seen: dict[str, list[CheckpointRecord]] = {}
    for r in sorted(records, key=lambda r: (r.created_at, r.global_step, r.id)):
        for d in r.data:
            seen.setdefault(d, []).append(r)
    if not seen:
        return "<p>No data segments recorded.</p>"
    rows = []
    for name, recs in seen.items():
        repos = ", ".join(dict.fromkeys(repo_short(r.repo) for r in recs))
        rows.append(f"<tr><td>{_e(name)}</td><td>{len(recs)}</td><td>{_e(repos)}</td>"
                    f"<td>{_e(recs[0].name)} ({_e(repo_short(recs[0].repo))})</td></tr>")  # fmt: skip
    return ("<table><tr><th>dataset</th><th>checkpoints whose weights list it</th><th>repositories</th>"
            f"<th>first listed by</th></tr>{''.join(rows)}</table>")  # fmt: skip


def _charts(records: Sequence[CheckpointRecord]) -> str:
    steps: dict[str, list[tuple[int, float, str]]] = {}
    for r in sorted(records, key=lambda r: (r.created_at, r.global_step, r.id)):
        for k, v in r.metrics.items():
            if v is not None and math.isfinite(v):  # the catalog stores nan and infinities as NULL
                steps.setdefault(k, []).append((r.global_step, float(v), r.repo))
    return "".join(chart(k, pts, PALETTE[i % len(PALETTE)]) for i, (k, pts) in enumerate(steps.items()))


def page(records: Sequence[CheckpointRecord], title: str, *, root: str | None = None, fold: int = FOLD) -> str:
    """The catalog page of a query's result (see the module docstring).

    Args:
        records: what a :class:`~ckptkit.catalog.Catalog` query returned (``where_data``, ``descendants``, ...).
        title: what the query asked, shown as the page's heading.
        root: the id of the checkpoint the query started at, drawn bold, when it is among ``records``.
        fold: runs of more plain ``train`` checkpoints than this are one node and one row.
    """
    repos = list(dict.fromkeys(r.repo for r in records))
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"
    ids = {r.id for r in records}
    outside = sum(1 for r in records for p, _ in r.parents if p not in ids)
    svg = dot_svg(lineage_dot(records, fold, root)) if records else None
    if svg is None:
        lines = "".join(f"<li>{_e(r.name)} ({_e(r.relation)}, step {r.global_step}) in {_e(r.repo)}</li>"
                        for r in _newest_first(records))  # fmt: skip
        graph = f"<p>(Graphviz's <code>dot</code> is not installed or nothing was found)</p><ul>{lines}</ul>"
    else:
        graph = f'<div class="graph">{svg}</div>'
    note = (f"<p>{outside} parent link(s) lead outside this result and are not drawn.</p>" if outside else "")
    depth = any(r.depth is not None for r in records)
    charts = _charts(records)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{PAGE_CSS}table.checkpoints td {{ font-size: 90%; }}</style></head><body>
<h1>{_e(title)}</h1>
<p>{len(records)} checkpoint(s) in {len(repos)} repositor{"y" if len(repos) == 1 else "ies"}: {_e(counts)}.
Every manifest was verified against its id and its parents' ids when it was indexed; the status is what each
repository held at its last sync.</p>
<ul>{"".join(f"<li><code>{_e(u)}</code></li>" for u in repos)}</ul>
<h2>Lineage</h2><p>{legend()}</p>{graph}{note}
<h2>Checkpoints (newest first)</h2>{_table(records, fold, depth)}
<h2>Training segments</h2>{_segments(records)}
<h2>Metrics against global step</h2>{charts or "<p>No metrics recorded.</p>"}
<h2>Data seen</h2>{_data(records)}
</body></html>
"""
