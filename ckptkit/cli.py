"""The ``ckptkit`` command: ls, show, verify, gc, demo."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ckptkit.api import checkpoints, gc, inspect, open_repository, verify
from ckptkit.errors import CkptkitError
from ckptkit.schema import Manifest


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


_opt = click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
                    help="fsspec storage option (repeatable), e.g. -o anon=true")  # fmt: skip


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)  # pragma: no cover


@click.group()
@click.version_option(package_name="ckptkit")
def main() -> None:
    """Inspect, verify and clean ckptkit checkpoint repositories (any fsspec URL)."""


@main.command("ls")
@click.argument("url")
@_opt
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def ls_cmd(url: str, options: tuple[str, ...], as_json: bool) -> None:
    """List the committed checkpoints in URL, oldest first."""
    found = checkpoints(url, _options(options))
    if as_json:
        click.echo(json.dumps([_row(m) for m in found], indent=2))
        return
    table = Table(title=f"{len(found)} checkpoint(s) in {url}")
    for col in ("name", "step", "epoch", "created", "size", "metrics", "id"):
        table.add_column(col, no_wrap=col in ("name", "created", "id"))
    for m in found:
        r = _row(m)
        table.add_row(r["name"], str(r["step"]), str(r["epoch"]), m.created_at.strftime("%m-%d %H:%M:%S"),
                      _size(r["bytes"]),
                      " ".join(f"{k}={v:.4g}" for k, v in m.metrics.items()), r["id"][:12])  # fmt: skip
    _console().print(table)


def _console() -> Console:
    # Not a terminal (a pipe, a log): wide enough that names and ids are never folded.
    return Console() if sys.stdout.isatty() else Console(width=160)


def _row(m: Manifest) -> dict[str, Any]:
    return {"name": m.name, "id": m.id, "step": m.progress.global_step, "epoch": m.progress.epoch,
            "created": m.created_at.isoformat(), "bytes": sum(o.size for o in m.objects.values()),
            "metrics": m.model_dump(mode="json")["metrics"]}  # fmt: skip


@main.command("show")
@click.argument("url")
@click.argument("name", required=False)
@_opt
@click.option("--json", "as_json", is_flag=True, help="print the whole manifest as JSON")
def show_cmd(url: str, name: str | None, options: tuple[str, ...], as_json: bool) -> None:
    """Show checkpoint NAME (default: the latest) as readable tables."""
    m = inspect(url, name, _options(options))
    if as_json:
        click.echo(m.model_dump_json(indent=2))
        return
    con = _console()
    head = Table(title=f"checkpoint {m.name}", show_header=False)
    head.add_column("field")
    head.add_column("value")
    p = m.progress
    for k, v in [("id", m.id), ("created", m.created_at.isoformat()), ("format", str(m.format_version)),
                 ("progress", f"epoch {p.epoch}, step {p.global_step} ({p.step_in_epoch} in epoch), "
                              f"{p.samples_seen} samples"),
                 ("objects", f"{len(m.objects)} ({_size(sum(o.size for o in m.objects.values()))})"),
                 ("lineage", f"{m.lineage.relation} " + ", ".join(f"{q.relation} <- {q.name or q.id[:12]}"
                                                                   for q in m.lineage.parents)),
                 ("environment", f"ckptkit {m.environment.ckptkit}, torch {m.environment.torch}, python "
                                 f"{m.environment.python} on {m.environment.host}"),
                 ("metrics", json.dumps(m.model_dump(mode="json")["metrics"])),
                 ("hparams", json.dumps(m.hparams))]:  # fmt: skip
        head.add_row(k, v)
    con.print(head)
    comps = Table(title="components")
    for col in ("name", "kind", "type", "tensors", "elements", "tied"):
        comps.add_column(col)
    for cname, c in m.components.items():
        numel = sum(_prod(t.shape) for t in c.tensors.values())
        comps.add_row(cname, c.kind, c.type or "", str(len(c.tensors)), f"{numel:,}", str(len(c.aliases)))
    con.print(comps)
    if m.data:
        data = Table(title="data")
        for col in ("name", "uri", "fingerprint", "size", "consumed"):
            data.add_column(col)
        for d in m.data:
            data.add_row(d.name, d.uri or "", (d.fingerprint or "")[:16], str(d.size or ""), str(d.samples_consumed))
        con.print(data)


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@main.command("verify")
@click.argument("url")
@click.argument("name", required=False)
@_opt
def verify_cmd(url: str, name: str | None, options: tuple[str, ...]) -> None:
    """Verify every object of checkpoint NAME (default: all). Exits 1 on any corruption."""
    reports = verify(url, name, _options(options))
    bad = 0
    for r in reports:
        if r.ok:
            click.echo(f"ok       {r.name}: {r.objects} objects, {_size(r.bytes)}")
        else:
            bad += 1
            for p in r.problems:
                click.echo(f"CORRUPT  {r.name}: {p}")
    if not reports:
        click.echo(f"no checkpoints in {url}")
    if bad:
        click.echo(f"{bad} of {len(reports)} checkpoint(s) failed verification", err=True)
        sys.exit(1)


@main.command("gc")
@click.argument("url")
@_opt
@click.option("--dry-run", is_flag=True, help="report what would be deleted, delete nothing")
def gc_cmd(url: str, options: tuple[str, ...], dry_run: bool) -> None:
    """Delete objects no checkpoint in URL references."""
    rep = gc(open_repository(url, _options(options)), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {rep.objects_removed} object(s), {_size(rep.bytes_removed)}; kept {rep.objects_kept}; "
               f"{verb} {rep.temp_files_removed} stale temporary file(s)")  # fmt: skip


@main.command("export")
@click.argument("url")
@click.argument("dest")
@click.argument("name", required=False)
@click.option("--component", help="model component to export (when the checkpoint holds several)")
@_opt
def export_cmd(url: str, dest: str, name: str | None, component: str | None, options: tuple[str, ...]) -> None:
    """Export checkpoint NAME's model (default: the latest) to DEST in its framework's format."""
    from ckptkit.export import export

    for f in export(url, dest, name, component=component, storage_options=_options(options)):
        click.echo(f)


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON schema of the manifest (published as docs/manifest.schema.json)."""
    from ckptkit.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@main.command("demo")
@click.option("--url", default="./ckptkit-demo", show_default=True, help="repository for the demo's checkpoints")
@click.option("--steps", default=60, show_default=True, help="training steps of the demo run")
def demo_cmd(url: str, steps: int) -> None:
    """Train a tiny model, checkpoint, get killed (SIGKILL), resume, and show it matches an uninterrupted run."""
    from ckptkit.demo import run_demo

    sys.exit(run_demo(url, steps))


def run() -> None:
    """Entry point that turns ckptkit errors into one clear line and exit status 2."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except CkptkitError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
