"""``ckptkit catalog html``: a catalog query's result as one self-contained HTML page (the lineage drawn across
repositories, a table of the checkpoints with integrity badges, data per training segment, metrics against
steps), drawn the way ``ckptkit audit --html`` draws one model's history. No torch is imported."""

from __future__ import annotations

import dataclasses

import click

from ckptkit.cli.catalog import catalog

__all__ = ["html_cmd"]


@catalog.command("html")
@click.option("--descendants", "descendants", metavar="ID", help="ID (an id or a unique prefix) and what descends "
              "from it, across repositories")  # fmt: skip
@click.option("--ancestors", "ancestors", metavar="ID", help="ID and every indexed checkpoint it came from")
@click.option("--data", "data", metavar="NAME|FINGERPRINT", help="every checkpoint whose weights saw a dataset")
@click.option("--repo", "repo", metavar="URL", help="every checkpoint of an indexed repository")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="the HTML file")
@click.pass_context
def html_cmd(ctx: click.Context, descendants: str | None, ancestors: str | None, data: str | None,
             repo: str | None, output: str) -> None:  # fmt: skip
    """Write a query's result as one HTML page: give one of --descendants, --ancestors, --data or --repo."""
    from ckptkit.catalog import Catalog
    from ckptkit.history.catalog_page import page

    given = {k: v for k, v in (("--descendants", descendants), ("--ancestors", ancestors), ("--data", data),
                               ("--repo", repo)) if v is not None}  # fmt: skip
    if len(given) != 1:
        raise click.UsageError("give exactly one of --descendants ID, --ancestors ID, --data NAME or --repo URL"
                               + (f" (got {', '.join(given)})" if given else ""))  # fmt: skip
    cat = Catalog(ctx.obj)
    ctx.call_on_close(cat.close)
    root = None
    if descendants is not None or ancestors is not None:
        start = cat.get(descendants or ancestors or "")
        root = start.id
        found = cat.descendants(start.id) if descendants is not None else cat.ancestors(start.id)
        word = "Descendants" if descendants is not None else "Ancestors"
        title = f"{word} of {start.name} ({start.id[:12]}) in {start.repo}"
        records = [dataclasses.replace(start, depth=0), *found]
        if not found:
            raise click.ClickException(f"{start.name} ({start.id[:12]}) in {start.repo} has no indexed "
                                       f"{word.lower()}: nothing written to {output}")  # fmt: skip
    elif data is not None:
        records = cat.where_data(data)
        title = f"Checkpoints whose weights saw {data}"
        if not records:
            raise click.ClickException(f"no indexed checkpoint saw a dataset named or fingerprinted {data!r}: "
                                       f"nothing written to {output} (`ckptkit catalog sync` indexes new ones)")
    else:
        assert repo is not None
        records = cat.ls(repo)
        title = f"Checkpoints of {records[0].repo if records else repo}"
        if not records:
            raise click.ClickException(f"the catalog holds no checkpoints of {repo}: nothing written to {output}")
    with open(output, "w", encoding="utf-8") as f:
        f.write(page(records, title, root=root))
    repos = len({r.repo for r in records})
    click.echo(f"wrote {output}: {len(records)} checkpoint(s) in {repos} repositor{'y' if repos == 1 else 'ies'}")
