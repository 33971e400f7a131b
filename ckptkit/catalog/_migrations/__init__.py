"""Alembic migrations of the catalog's schema, run by :func:`ckptkit.catalog.database.open_engine` at open."""
