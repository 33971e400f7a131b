"""``ckptkit catalog publish``: publish the catalog's checkpoints to an MLflow 3 tracking server, each as a logged
model (its step, metrics, data, parents and location; the weights stay in the repository).

Registers itself on the ``catalog`` group when imported (``ckptkit/cli/main.py`` imports it). MLflow and
SQLAlchemy are imported inside the command, so ``ckptkit --help`` does not pay for them.
"""

from __future__ import annotations

import json

import click

from ckptkit.cli.catalog import catalog

__all__ = ["publish_cmd"]


@catalog.command("publish")
@click.option("--mlflow", "tracking_uri", required=True, envvar="MLFLOW_TRACKING_URI", metavar="URI",
              help="the MLflow tracking server, e.g. http://127.0.0.1:5000 [env MLFLOW_TRACKING_URI]")  # fmt: skip
@click.option("--repo", default=None, metavar="URL", help="only this repository's checkpoints")
@click.option("--experiment", default="ckptkit", show_default=True, metavar="NAME",
              help="the MLflow experiment (created when missing)")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def publish_cmd(ctx: click.Context, tracking_uri: str, repo: str | None, experiment: str, as_json: bool) -> None:
    """Publish every checkpoint of the catalog (or of one repository) to MLflow as a logged model; a checkpoint
    published before is found by its id and not published twice (its status and parent link are updated)."""
    from ckptkit.catalog import Catalog
    from ckptkit.catalog.mlflow import MlflowPublisher

    publisher = MlflowPublisher(tracking_uri, experiment)  # checks the options before the catalog is opened
    cat = Catalog(ctx.obj)
    ctx.call_on_close(cat.close)
    report = publisher.publish_catalog(cat, repo)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    updated = sum(1 for p in report.published if p.updated)
    where = f"experiment {report.experiment!r} (id {report.experiment_id}) on {report.tracking_uri}"
    click.echo(f"{where}: published {report.created} checkpoint(s), {report.existing} already there"
               + (f" ({updated} with tags brought up to date)" if updated else ""))  # fmt: skip
