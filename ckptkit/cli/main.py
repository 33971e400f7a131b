"""The ``ckptkit`` command.

Verbs that read only manifests (``ls``, ``show``, ``log``, ``lineage``, ``gc``, ``schema``) import no torch, so
they start in a fraction of a second; verbs that touch tensors import it when they run.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from ckptkit.engine.manifests import latest_manifest, list_manifests, open_repository
from ckptkit.errors import CkptkitError, InvalidArgumentError
from ckptkit.interop.importers.registry import FORMATS
from ckptkit.schema import Manifest
from ckptkit.storage import Repository

__all__ = ["main", "run"]


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


def _repo(url: str, options: tuple[str, ...]) -> Repository:
    """The repository at ``url``; a URL fsspec cannot open (unknown protocol, options it refuses) is a typed error."""
    try:
        return open_repository(url, _options(options))
    except CkptkitError:
        raise
    except (ValueError, TypeError) as err:  # fsspec: "Protocol not known", an unexpected storage option
        raise InvalidArgumentError(f"cannot open repository {url!r}: {err}") from err


def _storage(url: str, options: tuple[str, ...]) -> dict[str, Any]:
    """The storage options for ``url``, once the URL is known to open (for verbs that open it themselves)."""
    _repo(url, options)
    return _options(options)


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
    found = list_manifests(_repo(url, options))
    if as_json:
        click.echo(json.dumps([_row(m) for m in found], indent=2))
        return
    rows = []
    for m in found:
        r = _row(m)
        rows.append([r["name"], str(r["step"]), str(r["epoch"]), m.created_at.strftime("%m-%d %H:%M:%S"),
                     _size(r["bytes"]), " ".join(f"{k}={v:.4g}" for k, v in m.metrics.items()),
                     r["id"][:12]])  # fmt: skip
    click.echo(click.style(f"{len(found)} checkpoint(s) in {url}", bold=True))
    _echo_table(["name", "step", "epoch", "created", "size", "metrics", "id"], rows, right={1, 2, 4})


def _echo_table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    """A plain aligned table: quick to print for hundreds of rows, and easy to grep or cut (no box drawing)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths,
                         strict=True))).rstrip()  # fmt: skip

    click.echo(click.style(line(header), bold=True))
    click.echo("\n".join(line(r) for r in rows) if rows else "(none)")


def _console(err: bool = False) -> Any:
    from rich.console import Console

    # Not a terminal (a pipe, a log): wide enough that names and ids are never folded.
    stream = sys.stderr if err else sys.stdout
    return Console(stderr=err) if stream.isatty() else Console(stderr=err, width=160)


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
    m = latest_manifest(_repo(url, options), name)
    if as_json:
        click.echo(m.model_dump_json(indent=2))
        return
    from rich.table import Table

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
@click.option("--chain", is_flag=True, help="also verify every ancestor (manifests, parent links, objects)")
@_opt
def verify_cmd(url: str, name: str | None, chain: bool, options: tuple[str, ...]) -> None:
    """Verify every object of checkpoint NAME (default: all). Exits 1 on any corruption."""
    if chain:
        from rich.progress import Progress

        from ckptkit.history.chain import verify_chain

        with Progress(transient=True, console=_console(err=True)) as bar:
            task = bar.add_task("verifying the chain", total=None)
            rep = verify_chain(url, name, storage_options=_storage(url, options),
                               progress=lambda what: bar.update(task, advance=1, description=what))  # fmt: skip
        for where, problems in rep.problems.items():
            for p in problems:
                click.echo(f"CORRUPT  {where}: {p}")
            if not problems:
                click.echo(f"ok       {where}")
        if not rep.ok:
            click.echo(f"the history of {name or 'the latest checkpoint'} failed verification", err=True)
            sys.exit(1)
        return
    from ckptkit.engine.verify import verify_repository

    reports = verify_repository(_repo(url, options), name)
    bad = 0
    for r in reports:
        if r.ok:
            click.echo(f"ok       {r.name}: {r.objects} objects, {_size(r.bytes)}")
        else:
            bad += 1
            for p in r.problems:
                click.echo(f"CORRUPT  {r.name}: {p}")
            for f in r.files:
                click.echo(f"DAMAGED  {r.name}: file {f}")
    if not reports:
        click.echo(f"no checkpoints in {url}")
    if bad:
        from ckptkit.errors import VerificationError

        click.echo(f"{bad} of {len(reports)} checkpoint(s) failed verification; {VerificationError.FIX}", err=True)
        sys.exit(1)


@main.command("log")
@click.argument("url")
@click.argument("name", required=False)
@_opt
def log_cmd(url: str, name: str | None, options: tuple[str, ...]) -> None:
    """History of checkpoint NAME (default: the latest), newest first, like git log."""
    from ckptkit.history.graph import history

    h = history(url, name, storage_options=_storage(url, options))
    out: list[str] = []  # printed at once: hundreds of checkpoints print in a blink
    for n in h.nodes:
        m = n.manifest
        out.append(click.style(f"checkpoint {m.name}", fg="yellow", bold=True) + " " + click.style(m.id, dim=True)
                   + (click.style(" (archived)", dim=True) if n.archived else ""))  # fmt: skip
        out.append(f"  date:     {m.created_at.strftime('%Y-%m-%d %H:%M:%S %Z')}   repository: {n.url}")
        parents = ", ".join(f"{p.relation} <- {p.name or p.id[:12]}" + (f" ({p.url})" if p.url else "")
                            for p in m.lineage.parents) or "none"  # fmt: skip
        out.append(f"  relation: {m.lineage.relation}   parents: {parents}")
        p = m.progress
        out.append(f"  progress: epoch {p.epoch}, step {p.global_step}, {p.samples_seen} samples")
        if m.metrics:
            out.append("  metrics:  " + " ".join(f"{k}={v:.4g}" for k, v in m.metrics.items()))
        if m.data:
            out.append("  data:     " + ", ".join(f"{d.name} ({d.samples_consumed} samples)" for d in m.data))
        for par in m.lineage.parents:
            shown: dict[str, object] = {}
            if "plan" in par.changes:
                shown["plan"] = par.changes["plan"].get("counts")  # type: ignore[union-attr]
            shown.update({k: v for k, v in par.changes.items() if k not in ("plan", "warnings")})
            if shown:
                out.append(f"  changes:  {json.dumps(shown)[:300]}")
        if m.lineage.source:
            out.append(f"  source:   {json.dumps(m.lineage.source)[:300]}")
        out.append("")
    for pid, why in h.missing.items():
        out.append(click.style(f"ancestor {pid[:12]} not found:", fg="red") + f" {why}")
    click.echo("\n".join(out))


@main.command("lineage")
@click.argument("url")
@click.argument("name", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "dot", "svg", "png", "json"]),
              default="text", show_default=True)  # fmt: skip
@click.option("-O", "--output", type=click.Path(dir_okay=False), help="write to a file (needed for png)")
@_opt
def lineage_cmd(url: str, name: str | None, fmt: str, output: str | None, options: tuple[str, ...]) -> None:
    """The ancestry DAG of checkpoint NAME (svg/png are rendered with Graphviz's `dot`)."""
    import shutil
    import subprocess

    from ckptkit.history.graph import history
    from ckptkit.history.render import render

    h = history(url, name, storage_options=_storage(url, options))
    if fmt in ("svg", "png"):
        dot = shutil.which("dot")
        if dot is None:
            raise click.ClickException(
                f"--format {fmt} needs Graphviz's `dot` (Debian: apt-get install graphviz); "
                "--format dot prints the graph for another renderer, --format mermaid for Markdown"
            )
        if fmt == "png" and not output:
            raise click.ClickException("--format png writes binary: give -O FILE.png")
        graph = render(h, "dot").encode()
        data = subprocess.run([dot, f"-T{fmt}"], input=graph, capture_output=True, check=True).stdout
        if output:
            with open(output, "wb") as f:
                f.write(data)
        else:
            click.echo(data.decode())
        return
    text = render(h, fmt)  # type: ignore[arg-type]
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    else:
        click.echo(text)


def _ref(ref: str) -> tuple[str, str | None]:
    url, sep, name = ref.rpartition("@")
    return (url, name) if sep and url else (ref, None)


@main.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--component", help="model component to compare (default: the only one)")
@click.option("--all", "show_all", is_flag=True, help="list unchanged tensors too")
@_opt
def diff_cmd(a: str, b: str, component: str | None, show_all: bool, options: tuple[str, ...]) -> None:
    """Compare checkpoints A and B, each URL@NAME (or URL for its latest): tensors and manifest."""
    from ckptkit.history.diff import diff

    (ua, na), (ub, nb) = _ref(a), _ref(b)
    _repo(ub, options)
    d = diff(ua, na, ub, nb, component=component, storage_options=_storage(ua, options))
    from rich.table import Table

    con = _console()
    table = Table(title="tensors: " + ", ".join(f"{v} {k}" for k, v in d.counts().items()))
    for col in ("tensor", "status", "shape A", "shape B", "relative L2 change"):
        table.add_column(col)
    for k, t in d.tensors.items():
        if t.status != "unchanged" or show_all:
            rel = "" if t.rel_l2 is None else f"{t.rel_l2:.3e}"
            table.add_row(k, t.status, str(t.shape_a or ""), str(t.shape_b or ""), rel)
    con.print(table)
    for title, part in (("hparams", d.hparams), ("metrics", d.metrics), ("data", d.data)):
        if part:
            con.print(f"[bold]{title}[/]")
            for k, (va, vb) in part.items():
                con.print(f"  {k}: {json.dumps(va)[:120]} -> {json.dumps(vb)[:120]}", markup=False)


@main.command("copy")
@click.argument("src")
@click.argument("dst")
@click.argument("names", nargs=-1)
@_opt
@click.option("--dst-option", "dst_options", multiple=True, metavar="KEY=VALUE",
              help="storage option for DST when it differs from SRC's")  # fmt: skip
def copy_cmd(
    src: str, dst: str, names: tuple[str, ...], options: tuple[str, ...], dst_options: tuple[str, ...]
) -> None:
    """Copy checkpoints NAMES (default: all) from SRC to DST, sending only objects DST lacks."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from ckptkit.history.copy import copy

    src_options = _storage(src, options)
    _repo(dst, dst_options or options)  # fails here, before any copying, when DST cannot be opened
    dst_storage = _options(dst_options) if dst_options else None
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True, console=_console(err=True)) as bar:
        task = bar.add_task("copying", total=None)
        rep = copy(src, dst, list(names) or None, storage_options=src_options, dst_storage_options=dst_storage,
                   progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    click.echo(f"copied {len(rep.checkpoints)} checkpoint(s), {rep.objects_copied} object(s) "
               f"({_size(rep.bytes_copied)}); "
               f"{rep.objects_present} already there; {len(rep.skipped)} identical checkpoint(s) skipped; "
               f"{rep.ancestors_archived} ancestor manifest(s) archived")  # fmt: skip


@main.command("audit")
@click.argument("url")
@click.argument("name", required=False)
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="also write a self-contained HTML report")
@_opt
def audit_cmd(url: str, name: str | None, html_file: str | None, options: tuple[str, ...]) -> None:
    """A readable report of one model's history: base, data, hyperparameters, metrics, transfers, integrity."""
    from ckptkit.history.audit import audit, render_html, render_text

    a = audit(url, name, storage_options=_storage(url, options))
    click.echo(render_text(a))
    if html_file:
        with open(html_file, "w") as f:
            f.write(render_html(a))
        click.echo(f"wrote {html_file}")
    if not a.integrity.ok:
        sys.exit(1)


@main.command("gc")
@click.argument("url")
@_opt
@click.option("--dry-run", is_flag=True, help="report what would be deleted, delete nothing")
def gc_cmd(url: str, options: tuple[str, ...], dry_run: bool) -> None:
    """Delete objects no checkpoint in URL references (it runs on a full disk too, to free space there)."""
    from ckptkit.engine.gc import collect_garbage
    from ckptkit.errors import StorageError, StorageFullError

    try:
        rep = collect_garbage(open_repository(url, _options(options)), dry_run=dry_run)
    except CkptkitError:
        raise  # typed, with its fix (a full disk: StorageFullError); printed as one `error:` line
    except OSError as err:  # the store refused gc (permissions, a read-only filesystem): one line, no traceback
        if err.errno in StorageFullError.ERRNOS:  # a full disk that no backend named
            raise StorageFullError(url, err.filename or url, err.errno) from err
        raise StorageError(url, "gc of", None, f"{type(err).__name__}: {err}",
                           "check the repository's permissions and its filesystem, then retry") from err
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {rep.objects_removed} object(s), {_size(rep.bytes_removed)}; kept {rep.objects_kept}; "
               f"{verb} {rep.temp_files_removed} stale temporary file(s)")  # fmt: skip


@main.command("export")
@click.argument("url")
@click.argument("dest")
@click.argument("name", required=False)
@click.option("--component", help="model component to export (when the checkpoint holds several)")
@click.option("--format", "fmt", type=click.Choice(["model", "hf-trainer", "lightning"]), default="model",
              show_default=True, help="model: the model in its framework's format; hf-trainer: a Trainer "
              "checkpoint-N folder; lightning: a .ckpt for fit(ckpt_path=...)")  # fmt: skip
@_opt
def export_cmd(url: str, dest: str, name: str | None, component: str | None, fmt: str,
               options: tuple[str, ...]) -> None:  # fmt: skip
    """Export checkpoint NAME (default: the latest) to DEST: its model in its framework's format, or (--format) a
    checkpoint HF Trainer or Lightning resumes from."""
    from ckptkit.interop.export import export

    for f in export(url, dest, name, component=component, format=fmt, storage_options=_storage(url, options)):
        click.echo(f)


@main.command("import")
@click.argument("src", type=click.Path(exists=True))
@click.argument("url")
@click.argument("name", required=False)
@click.option("--format", "fmt", help="the source's layout (default: detected)",
              type=click.Choice(FORMATS))  # fmt: skip
@click.option("--model", "model_spec", metavar="SPEC",
              help="the architecture, to name optimizer parameters: timm:NAME, hf:CONFIG_DIR, torchvision:NAME or "
                   "pkg.module:factory, with ,key=value arguments (e.g. timm:resnet18,num_classes=10)")  # fmt: skip
@_opt
def import_cmd(src: str, url: str, name: str | None, fmt: str | None, model_spec: str | None,
               options: tuple[str, ...]) -> None:  # fmt: skip
    """Import a foreign checkpoint SRC (HF folder, Trainer checkpoint, Lightning, timm, mmdet, DCP) into URL.

    Nothing is unpickled but tensors and plain containers; a file that needs more is refused, naming the
    entry and the class. Files that do not say which model they hold (DCP, Lightning, mmdet, timm without args)
    name their optimizer's parameters by --model."""
    from ckptkit.interop.importers import import_from

    model = _spec_model(model_spec)
    m = import_from(src, url, name, format=fmt, storage_options=_storage(url, options), model=model)
    source = m.lineage.source or {}
    click.echo(f"imported {src} as {m.name} ({m.id[:12]}), format {source.get('format')}: "
               f"components {', '.join(m.components)}")  # fmt: skip
    skipped = source.get("skipped") or {}
    for entry, why in (skipped.items() if isinstance(skipped, dict) else ((str(e), "") for e in skipped)):  # type: ignore[union-attr]
        click.echo(f"  skipped {entry}: {why}" if why else f"  skipped {entry}")
    for note in source.get("notes") or []:  # type: ignore[union-attr]
        click.echo(f"  note: {note}")


def _spec_model(spec: str | None) -> Any:
    """The model a --model SPEC names (None without one); see :mod:`ckptkit.interop.model_spec`."""
    if spec is None:
        return None
    from ckptkit.interop.model_spec import build_model

    if os.getcwd() not in sys.path:  # pkg.module:factory is found from the current directory, as `python -m` does
        sys.path.insert(0, os.getcwd())
    return build_model(spec)


@main.command("import-files")
@click.argument("url")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--optimizer", type=click.Path(exists=True, dir_okay=False),
              help="a torch file of optimizer.state_dict() for the same parameters")  # fmt: skip
@click.option("--step", default=0, show_default=True, type=click.IntRange(min=0), help="optimizer steps done")
@click.option("--epoch", default=0, show_default=True, type=click.IntRange(min=0), help="epochs done")
@click.option("--samples-seen", default=0, show_default=True, type=click.IntRange(min=0), help="samples trained on")
@click.option("--name", help="checkpoint name (default: import-step-<step>)")
@click.option("--model", "model_spec", metavar="SPEC",
              help="the architecture, to check the weights and name the optimizer's parameters (as for import)")
@_opt
def import_files_cmd(url: str, weights: str, optimizer: str | None, step: int, epoch: int, samples_seen: int,
                     name: str | None, model_spec: str | None, options: tuple[str, ...]) -> None:  # fmt: skip
    """Make a checkpoint in URL of bare files: a WEIGHTS file (torch state_dict or .safetensors), optionally an
    optimizer file, and how far training had got; `continue_from` then continues it.

    Without --model the optimizer's numbered parameters are named by order only when that is certain; otherwise
    it is refused and nothing is written."""
    from ckptkit.interop.importers import import_files

    m = import_files(url, weights, optimizer=optimizer, step=step, epoch=epoch, samples_seen=samples_seen, name=name,
                     model=_spec_model(model_spec), storage_options=_storage(url, options))  # fmt: skip
    click.echo(f"imported {weights}{' + ' + optimizer if optimizer else ''} as {m.name} ({m.id[:12]}) at step "
               f"{m.progress.global_step}, epoch {m.progress.epoch}: components {', '.join(m.components)}")  # fmt: skip


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
    from ckptkit.cli.demo import run_demo

    sys.exit(run_demo(url, steps))


from ckptkit.cli import catalog_publish as _catalog_publish  # noqa: E402,F401  (registers `catalog publish`)
from ckptkit.cli.catalog import catalog as catalog_group  # noqa: E402

main.add_command(catalog_group)


def run() -> None:
    """Entry point: every error a user can cause ends in one ``error: ...`` line on stderr, never a traceback.

    Exit status: 2 for ckptkit errors, usage errors and unreadable or unwritable files; the status click gives for
    its other errors; 130 when interrupted (Ctrl-C); 1 for anything unexpected (a bug in ckptkit: the line says
    so, and ``CKPTKIT_TRACEBACK=1`` prints the traceback).
    """
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort as err:
        if isinstance(err.__context__, EOFError):  # click turns any EOFError into Abort: this one came from code
            _fail(err.__context__)
        sys.exit(130)
    except click.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except CkptkitError as err:
        click.echo(f"error: {_one_line(err)}", err=True)
        sys.exit(2)
    except OSError as err:  # a path given on the command line that cannot be read or written (-O, --html ...)
        click.echo(f"error: {_one_line(err)}", err=True)
        sys.exit(2)
    except (SystemExit, KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as err:  # torch.distributed.checkpoint raises BaseExceptions for errors too
        _fail(err)


def _fail(err: BaseException) -> None:
    if os.environ.get("CKPTKIT_TRACEBACK"):
        raise err
    click.echo(f"error: unexpected {type(err).__name__}: {_one_line(err) or '(no message)'}; this is a bug in "
               "ckptkit: please report it (CKPTKIT_TRACEBACK=1 prints the traceback)", err=True)  # fmt: skip
    sys.exit(1)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    run()
