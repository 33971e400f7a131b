"""The catalog's tables (SQLAlchemy Core), as the newest migration leaves them.

The migrations in ``ckptkit/catalog/_migrations/versions`` create and change the tables; this module describes
the result for the queries. Every row is derived from manifests, so the catalog can be rebuilt from the
repositories at any time. A checkpoint is keyed by its manifest id (the blake3 of its manifest): the same
checkpoint found in two repositories (a copy) is one row of ``checkpoints`` and two rows of ``locations``.

Example:
    >>> sorted(t.name for t in metadata.sorted_tables)[:3]
    ['checkpoint_objects', 'checkpoints', 'component_tensors']
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "STATUSES",
    "VERSION_TABLE",
    "checkpoint_objects",
    "checkpoints",
    "component_tensors",
    "data_segments",
    "hparams",
    "locations",
    "metadata",
    "metrics",
    "object_tensors",
    "parents",
    "repositories",
]

VERSION_TABLE = "catalog_version"
"""Where alembic records the catalog's schema revision (not ``alembic_version``: a team's PostgreSQL database may
hold another application's migrations)."""

STATUSES = ("committed", "incomplete", "archived", "removed")
"""A checkpoint's status in one repository: ``committed`` (its manifest is under ``checkpoints/`` and every object
it lists is stored), ``incomplete`` (committed, some objects missing), ``archived`` (pruned by retention: its
manifest is under ``lineage/``, its objects are garbage for gc), ``removed`` (its manifest is gone from the
repository; the catalog keeps its history)."""

metadata = MetaData()

repositories = Table(
    "repositories",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", String(2048), nullable=False, unique=True),
    Column("added_at", DateTime, nullable=False),
    Column("synced_at", DateTime, nullable=True),  # its last sync: every location it did not change was there
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", String(64), primary_key=True),  # the manifest id: unique across every repository
    Column("name", String(128), nullable=False),
    Column("format_version", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),  # UTC, without offset (SQLite and PostgreSQL sort it alike)
    Column("relation", String(16), nullable=False),
    Column("run", String(128), nullable=True),
    Column("epoch", BigInteger, nullable=False),
    Column("global_step", BigInteger, nullable=False),
    Column("samples_seen", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),  # bytes of the objects it lists
    Column("manifest", Text, nullable=False),  # the verified manifest bytes: later migrations backfill from it
    Column("indexed_at", DateTime, nullable=False),
    Index("ix_checkpoints_created_at", "created_at"),
)

locations = Table(
    "locations",
    metadata,
    Column("repository_id", Integer, ForeignKey("repositories.id", ondelete="CASCADE"), primary_key=True),
    Column("checkpoint_id", String(64), ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("objects_missing", Integer, nullable=False, default=0),
    Column("seen_at", DateTime, nullable=False),  # when a sync last set its name or status (see synced_at)
    Index("ix_locations_checkpoint", "checkpoint_id"),
)

checkpoint_objects = Table(
    "checkpoint_objects",
    metadata,
    Column("checkpoint_id", String(64), ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
    Column("object", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Index("ix_checkpoint_objects_object", "object"),
)
"""The objects each checkpoint lists (what a sync checks against the repository's listing)."""

parents = Table(
    "parents",
    metadata,
    Column("child_id", String(64), ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("parent_id", String(64), nullable=False),  # not a foreign key: the parent may not be indexed (yet)
    Column("relation", String(16), nullable=False),
    Column("parent_name", String(128), nullable=True),
    Column("parent_url", String(2048), nullable=True),
    Index("ix_parents_parent", "parent_id"),
)

data_segments = Table(
    "data_segments",
    metadata,
    Column("checkpoint_id", String(64), ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("name", String(1024), nullable=False),
    Column("uri", String(4096), nullable=True),
    Column("fingerprint", String(1024), nullable=True),
    Column("size", BigInteger, nullable=True),
    Column("split", String(256), nullable=True),
    Column("samples_consumed", BigInteger, nullable=False),
    Index("ix_data_segments_name", "name"),
    Index("ix_data_segments_fingerprint", "fingerprint"),
)

metrics = Table(
    "metrics",
    metadata,
    Column("checkpoint_id", String(64), ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(256), primary_key=True),
    Column("value", Float, nullable=True),  # NULL for nan and infinities (the manifest keeps them)
    Index("ix_metrics_name_value", "name", "value"),
)

hparams = Table(
    "hparams",
    metadata,
    Column("checkpoint_id", String(64), ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("value", Text, nullable=False),  # canonical JSON of the value
    Index("ix_hparams_key_value", "key", "value"),
)

component_tensors = Table(
    "component_tensors",
    metadata,
    Column("checkpoint_id", String(64), ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
    Column("component", String(128), primary_key=True),
    Column("name", String(4096), primary_key=True),
    Column("object", String(64), nullable=False),
    Column("key", String(4096), nullable=False),
    Index("ix_component_tensors_object", "object"),
)
"""The tensors of every model component (not optimizer state): where each is stored."""

object_tensors = Table(
    "object_tensors",
    metadata,
    Column("object", String(64), primary_key=True),
    Column("key", String(4096), primary_key=True),
    Column("tensor_hash", String(64), nullable=False),
    Column("dtype", String(16), nullable=False),
    Column("shape", String(256), nullable=False),  # JSON list
    Index("ix_object_tensors_hash", "tensor_hash"),
)
"""The content hash of every tensor in an object (``tensor_hash``, see :mod:`ckptkit.catalog.tensors`). An object
is named by the hash of its bytes, so its tensors' hashes are computed once for every repository and checkpoint."""
