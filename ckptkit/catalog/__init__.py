"""The catalog: an index of manifests from many repositories, in SQLite (the default) or PostgreSQL.

It answers questions across runs that one repository cannot: which checkpoints saw a dataset (directly or
through the checkpoints they were trained from), what descends from or led to a checkpoint across repositories,
which checkpoint holds the weights of an exported folder, the best checkpoint by a metric. The repositories stay
the source of truth; the catalog is rebuilt from them at any time. Needs ``pip install 'ckptkit[catalog]'``
(``ckptkit[postgres]`` for PostgreSQL). See docs/catalog.md.

Example::

    from ckptkit.catalog import Catalog

    cat = Catalog()                       # ~/.local/share/ckptkit/catalog.db, or $CKPTKIT_CATALOG
    cat.add("s3://bucket/runs/base")
    cat.add("./runs/fine")
    [r.name for r in cat.where_data("imagenet-train")]
"""

import importlib.util as _util

__all__ = ["SCHEMA_REVISION", "Catalog", "CheckpointRecord", "FindMatch", "IndexReport", "Location"]

if _util.find_spec("sqlalchemy") is not None:
    from ckptkit.catalog.catalog import Catalog
    from ckptkit.catalog.database import SCHEMA_REVISION
    from ckptkit.catalog.indexer import IndexReport
    from ckptkit.catalog.queries import CheckpointRecord, FindMatch, Location
else:  # the catalog is an extra; ckptkit.catalog.mlflow (a manager's mlflow=) needs only the MLflow client

    def __getattr__(name: str) -> object:
        if name in __all__:
            from ckptkit.errors import MissingDependencyError

            raise MissingDependencyError("the catalog needs SQLAlchemy and alembic: pip install 'ckptkit[catalog]' "
                                         "('ckptkit[postgres]' for PostgreSQL)")  # fmt: skip
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
