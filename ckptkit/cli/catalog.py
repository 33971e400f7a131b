"""``ckptkit catalog``: index repositories and ask across them (which checkpoints saw this data, what descends
from this one, which holds these weights, the best by a metric).

SQLAlchemy (and the catalog) are imported inside each command, so ``ckptkit --help`` and the other verbs do not
pay for them; no command imports torch (``find`` reads safetensors headers itself).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ckptkit.catalog import Catalog, CheckpointRecord, FindMatch, IndexReport

__all__ = ["catalog"]


def _open(ctx: click.Context) -> Catalog:
    from ckptkit.catalog import Catalog

    cat = Catalog(ctx.obj)
    ctx.call_on_close(cat.close)
    return cat


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)  # a pipe: never fold ids and names


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _records(recs: Sequence[CheckpointRecord], as_json: bool, title: str, depth: bool = False) -> None:
    if as_json:
        _print_json([r.to_json() for r in recs])
        return
    from rich.table import Table

    table = Table(title=f"{title} ({len(recs)})")
    cols = ["repo", "name", "id", "status", "relation", "step", "created", "metrics"]
    for col in [*cols, "depth"] if depth else cols:
        table.add_column(col)
    for r in recs:
        metrics = ", ".join(f"{k}={'nan' if v is None else f'{v:.4g}'}" for k, v in r.metrics.items())
        table.add_row(r.repo, r.name, r.id[:12], r.status, r.relation, str(r.global_step),
                      r.created_at.strftime("%Y-%m-%d %H:%M:%S"), metrics,
                      *([str(r.depth)] if depth else []))  # fmt: skip
    _console().print(table)


def _report(reports: Sequence[IndexReport], as_json: bool) -> None:
    if as_json:
        _print_json([r.to_json() for r in reports])
    else:
        for r in reports:
            status = ", ".join(f"{n} {s}" for s, n in sorted(r.status.items())) or "no checkpoints"
            click.echo(f"{r.repo}: indexed {len(r.indexed)}, read {r.read} "
                       f"manifest(s), hashed {r.objects_hashed} object(s); {status}")  # fmt: skip
            for where, why in r.rejected:
                click.echo(f"  not indexed: {where}: {why}", err=True)
    if any(r.rejected for r in reports):
        sys.exit(1)


_json = click.option("--json", "as_json", is_flag=True, help="print JSON")


@click.group("catalog")
@click.option("--catalog", "url", envvar="CKPTKIT_CATALOG", metavar="URL",
              help="the catalog: a file path (SQLite), sqlite:///PATH or postgresql://USER@HOST/DB "
                   "[env CKPTKIT_CATALOG; default ~/.local/share/ckptkit/catalog.db]")  # fmt: skip
@click.pass_context
def catalog(ctx: click.Context, url: str | None) -> None:
    """Index repositories and query across them (needs `pip install 'ckptkit[catalog]'`)."""
    ctx.obj = url


_workers = click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                        help="index N repositories at a time in worker processes [default: one per CPU, at most 8, "
                             "when there are 4 repositories or more for each]")  # fmt: skip


@catalog.command("add")
@click.argument("urls", nargs=-1, required=True, metavar="URL...")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option (repeatable; used now, never stored)")  # fmt: skip
@click.option("--no-tensors", is_flag=True, help="do not read objects to hash tensors (find will not match these)")
@click.option("--full", is_flag=True, help="read every manifest again, not only new names")
@_workers
@_json
@click.pass_context
def add_cmd(ctx: click.Context, urls: tuple[str, ...], options: tuple[str, ...], no_tensors: bool, full: bool,
            workers: int | None, as_json: bool) -> None:  # fmt: skip
    """Index the repositories at URL... (exit 1 when a manifest was not indexed: tampered or a broken chain)."""
    opts = _options(options)
    cat = _open(ctx)
    if len(urls) == 1:  # one repository: its errors are the command's (a typo in the URL says so)
        _report([cat.add(urls[0], opts or None, hash_tensors=not no_tensors, full=full)], as_json)
    else:
        _report(cat.add_all(urls, opts or None, hash_tensors=not no_tensors, full=full, workers=workers), as_json)


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise click.BadParameter(f"{p!r}: use KEY=VALUE (VALUE may be JSON)", param_hint="--option")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@catalog.command("sync")
@click.option("--repo", default=None, metavar="URL", help="only this repository")
@click.option("--no-tensors", is_flag=True, help="do not read objects to hash tensors")
@_workers
@_json
@click.pass_context
def sync_cmd(ctx: click.Context, repo: str | None, no_tensors: bool, workers: int | None, as_json: bool) -> None:
    """Index what is new in every known repository (exit 1 when a manifest was not indexed)."""
    _report(_open(ctx).sync(repo, hash_tensors=not no_tensors, workers=workers), as_json)


@catalog.command("where")
@click.option("--data", "data", required=True, metavar="NAME|FINGERPRINT", help="a dataset's name or fingerprint")
@_json
@click.pass_context
def where_cmd(ctx: click.Context, data: str, as_json: bool) -> None:
    """Checkpoints whose weights saw a dataset, directly (depth 0) or through the checkpoints they came from."""
    _records(_open(ctx).where_data(data), as_json, f"checkpoints whose weights saw {data}", depth=True)


@catalog.command("descendants")
@click.argument("checkpoint_id", metavar="ID")
@_json
@click.pass_context
def descendants_cmd(ctx: click.Context, checkpoint_id: str, as_json: bool) -> None:
    """Every indexed checkpoint descending from ID (an id or a unique prefix), across repositories."""
    _records(_open(ctx).descendants(checkpoint_id), as_json, f"descendants of {checkpoint_id}", depth=True)


@catalog.command("ancestors")
@click.argument("checkpoint_id", metavar="ID")
@_json
@click.pass_context
def ancestors_cmd(ctx: click.Context, checkpoint_id: str, as_json: bool) -> None:
    """Every indexed ancestor of ID (an id or a unique prefix), across repositories."""
    _records(_open(ctx).ancestors(checkpoint_id), as_json, f"ancestors of {checkpoint_id}", depth=True)


@catalog.command("find")
@click.argument("path", type=click.Path(exists=True))
@_json
@click.pass_context
def find_cmd(ctx: click.Context, path: str, as_json: bool) -> None:
    """Which checkpoints hold the weights in PATH (a .safetensors file or an exported folder), by content."""
    found: list[FindMatch] = _open(ctx).find(path)
    if as_json:
        _print_json([f.to_json() for f in found])
        return
    from rich.table import Table

    table = Table(title=f"checkpoints holding the weights of {path} ({len(found)})")
    for col in ("repo", "name", "id", "status", "component", "match"):
        table.add_column(col)
    for f in found:
        r = f.checkpoint
        match = "exact" if f.exact else f"{f.matched} of {f.tensors} tensors"
        table.add_row(r.repo, r.name, r.id[:12], r.status, f.component, match)
    _console().print(table)


@catalog.command("best")
@click.option("--metric", required=True, help="a metric passed to save(metrics=...)")
@click.option("--min", "mode", flag_value="min", default=True, help="lowest is best (default; a loss)")
@click.option("--max", "mode", flag_value="max", help="highest is best (an accuracy)")
@click.option("--repo", default=None, metavar="URL", help="only this repository")
@click.option("--limit", default=1, show_default=True, type=click.IntRange(min=1), help="how many")
@click.option("--include-archived", is_flag=True, help="count pruned checkpoints too")
@_json
@click.pass_context
def best_cmd(ctx: click.Context, metric: str, mode: str, repo: str | None, limit: int, include_archived: bool,
             as_json: bool) -> None:  # fmt: skip
    """The best checkpoint(s) by a metric, across every repository or in one."""
    recs = _open(ctx).best(metric, "max" if mode == "max" else "min", repo, limit=limit,
                           include_archived=include_archived)  # fmt: skip
    _records(recs, as_json, f"best by {metric} ({mode})")


@catalog.command("ls")
@click.option("--repo", default=None, metavar="URL", help="only this repository")
@click.option("--relation", default=None, type=click.Choice(["init", "train", "resume", "continue", "transfer",
                                                             "import"]), help="lineage relation")  # fmt: skip
@click.option("--since", default=None, metavar="ISO", help="created at or after (2026-01-31, or with a time)")
@click.option("--hparam", "hparams", multiple=True, metavar="KEY=VALUE", help="hyperparameter value (repeatable)")
@click.option("--status", default=None, type=click.Choice(["committed", "incomplete", "archived", "removed"]))
@click.option("--limit", default=None, type=click.IntRange(min=1))
@_json
@click.pass_context
def ls_cmd(ctx: click.Context, repo: str | None, relation: str | None, since: str | None, hparams: tuple[str, ...],
           status: str | None, limit: int | None, as_json: bool) -> None:  # fmt: skip
    """Indexed checkpoints, oldest first, with filters."""
    hp = {}
    for p in hparams:
        key, sep, _ = p.partition("=")
        if not sep:
            raise click.BadParameter(f"{p!r}: use KEY=VALUE (VALUE as JSON: 0.001, \"adamw\", true)",
                                     param_hint="--hparam")  # fmt: skip
        hp[key] = _options((p,))[key]
    recs = _open(ctx).ls(repo, relation=relation, since=since, hparams=hp or None, status=status, limit=limit)
    _records(recs, as_json, "checkpoints")

from ckptkit.cli import catalog_html as _catalog_html  # noqa: E402,F401  (registers `catalog html` on the group)
