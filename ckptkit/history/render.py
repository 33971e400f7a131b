"""Render a lineage DAG as an indented text tree, Mermaid, Graphviz DOT or JSON. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

from ckptkit.history.graph import History
from ckptkit.schema import Manifest

__all__ = ["Format", "render"]

Format = Literal["text", "mermaid", "dot", "json"]


def _short(m: Manifest) -> str:
    bits = [f"step {m.progress.global_step}"]
    if m.metrics:
        bits.append(" ".join(f"{k}={v:.4g}" for k, v in list(m.metrics.items())[:3]))
    return ", ".join(bits)


def render(h: History, fmt: Format) -> str:
    """The DAG as text (indented tree), Mermaid, Graphviz DOT or JSON."""
    if fmt == "json":
        return json.dumps({
            "nodes": [{"id": n.id, "name": n.manifest.name, "url": n.url, "relation": n.manifest.lineage.relation,
                       "step": n.manifest.progress.global_step,
                       "metrics": n.manifest.model_dump(mode="json")["metrics"],
                       "created_at": n.manifest.created_at.isoformat(), "archived": n.archived}
                      for n in h.nodes],
            "edges": [{"child": c, "parent": p, "relation": r} for c, p, r in h.edges],
            "missing": h.missing,
        }, indent=2)  # fmt: skip
    if fmt == "mermaid":
        lines = ["graph BT"]
        for n in h.nodes:
            lines.append(f'  n{n.id[:12]}["{_esc(n.manifest.name)}<br/>{_esc(_short(n.manifest))}"]')
        for c, p, r in h.edges:
            lines.append(f"  n{c[:12]} -->|{r}| n{p[:12]}" if h.node(p) else f"  n{c[:12]} -->|{r}| missing{p[:12]}")
        return "\n".join(lines)
    if fmt == "dot":
        lines = ["digraph lineage {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        for n in h.nodes:
            style = ', style="dashed"' if n.archived else ""
            lines.append(f'  "{n.id[:12]}" [label="{_esc(n.manifest.name)}\\n{_esc(_short(n.manifest))}"{style}];')
        for c, p, r in h.edges:
            lines.append(f'  "{c[:12]}" -> "{p[:12]}" [label="{r}"];')
        lines.append("}")
        return "\n".join(lines)
    return "\n".join(_text(h))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', "'").replace("<", "&lt;").replace(">", "&gt;")


def _text(h: History, fold: int = 3) -> Iterator[str]:
    """An indented tree: a linear chain stays at one depth, each further parent (a fusion's second source)
    opens a deeper level; runs of more than ``fold`` plain ``train`` checkpoints are folded into one line."""
    parents: dict[str, list[tuple[str, str]]] = {}
    for c, p, r in h.edges:
        parents.setdefault(c, []).append((p, r))
    printed: set[str] = set()  # visited by the walk
    shown: set[str] = set()  # printed as a line of their own

    def line(id_: str, relation: str | None, depth: int) -> str:
        pad = "  " * depth + ("<- " if relation else "")
        n = h.node(id_)
        if n is None:
            return f"{pad}[{relation}] {id_[:12]} (not found: {h.missing.get(id_, 'unknown')})"
        rel = f" [{relation}]" if relation else ""
        archived = " archived" if n.archived else ""
        again = " (see above)" if id_ in shown else ""
        shown.add(id_)
        return f"{pad}{n.manifest.name}{rel} {_short(n.manifest)}  {n.id[:12]}{archived}{again}"

    def chain(id_: str, relation: str | None, depth: int) -> Iterator[str]:
        run: list[str] = []  # folded `train` checkpoints not yet printed
        while True:
            n = h.node(id_)
            ps = parents.get(id_, [])
            plain = relation == "train" and n is not None and id_ not in printed and [r for _, r in ps] == ["train"]
            if plain:
                run.append(id_)
            else:
                if len(run) > fold:
                    first, last = h.node(run[0]), h.node(run[-1])
                    assert first is not None and last is not None
                    yield (f"{'  ' * depth}<- ... {len(run)} train checkpoints, steps "
                           f"{first.manifest.progress.global_step} down to {last.manifest.progress.global_step} ...")
                else:
                    yield from (line(r, "train", depth) for r in run)
                run = []
                yield line(id_, relation, depth)
            if n is None or id_ in printed:
                return
            printed.add(id_)
            if not ps:
                return
            for p, r in ps[1:]:  # further parents branch off one level deeper
                yield from chain(p, r, depth + 1)
            id_, relation = ps[0]

    if h.nodes:
        yield from chain(h.nodes[0].id, None, 0)
