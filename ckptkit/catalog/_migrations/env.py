"""Alembic's environment: runs the migrations on the connection the catalog opened (in its transaction).

Alembic executes this file while it upgrades; imported any other way (a doctest collector) it does nothing.
"""

from __future__ import annotations

from alembic import context

from ckptkit.catalog.tables import VERSION_TABLE


def run() -> None:
    """Run the pending migrations on ``config.attributes["connection"]``."""
    context.configure(connection=context.config.attributes["connection"], version_table=VERSION_TABLE)
    with context.begin_transaction():  # a no-op: the catalog's own transaction (and lock) holds the whole upgrade
        context.run_migrations()


if hasattr(context, "config"):  # set only while alembic runs an environment
    run()
