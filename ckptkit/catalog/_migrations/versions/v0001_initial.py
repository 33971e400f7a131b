"""Catalog schema 0001: repositories, checkpoints and their locations, lineage edges, data segments, metrics,
hparams, and the per-tensor content hashes that ``find`` matches exported weights against.

Frozen: a later change of the schema is a new revision (``v0002_*.py``, ``down_revision = "0001"``), never an
edit of this one, so every catalog ever created upgrades along the same steps.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "repositories",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("url", sa.String(2048), nullable=False, unique=True),
        sa.Column("added_at", sa.DateTime, nullable=False),
        sa.Column("synced_at", sa.DateTime, nullable=True),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("format_version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("relation", sa.String(16), nullable=False),
        sa.Column("run", sa.String(128), nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("global_step", sa.BigInteger, nullable=False),
        sa.Column("samples_seen", sa.BigInteger, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("indexed_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_checkpoints_created_at", "checkpoints", ["created_at"])
    op.create_table(
        "locations",
        sa.Column("repository_id", sa.Integer, sa.ForeignKey("repositories.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("checkpoint_id", sa.String(64), sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("objects_missing", sa.Integer, nullable=False),
        sa.Column("seen_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_locations_checkpoint", "locations", ["checkpoint_id"])
    op.create_table(
        "checkpoint_objects",
        sa.Column("checkpoint_id", sa.String(64), sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("object", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_checkpoint_objects_object", "checkpoint_objects", ["object"])
    op.create_table(
        "parents",
        sa.Column("child_id", sa.String(64), sa.ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("parent_id", sa.String(64), nullable=False),
        sa.Column("relation", sa.String(16), nullable=False),
        sa.Column("parent_name", sa.String(128), nullable=True),
        sa.Column("parent_url", sa.String(2048), nullable=True),
    )
    op.create_index("ix_parents_parent", "parents", ["parent_id"])
    op.create_table(
        "data_segments",
        sa.Column("checkpoint_id", sa.String(64), sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("uri", sa.String(4096), nullable=True),
        sa.Column("fingerprint", sa.String(1024), nullable=True),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("split", sa.String(256), nullable=True),
        sa.Column("samples_consumed", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_data_segments_name", "data_segments", ["name"])
    op.create_index("ix_data_segments_fingerprint", "data_segments", ["fingerprint"])
    op.create_table(
        "metrics",
        sa.Column("checkpoint_id", sa.String(64), sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("value", sa.Float, nullable=True),
    )
    op.create_index("ix_metrics_name_value", "metrics", ["name", "value"])
    op.create_table(
        "hparams",
        sa.Column("checkpoint_id", sa.String(64), sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("key", sa.String(256), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_index("ix_hparams_key_value", "hparams", ["key", "value"])
    op.create_table(
        "component_tensors",
        sa.Column("checkpoint_id", sa.String(64), sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("component", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(4096), primary_key=True),
        sa.Column("object", sa.String(64), nullable=False),
        sa.Column("key", sa.String(4096), nullable=False),
    )
    op.create_index("ix_component_tensors_object", "component_tensors", ["object"])
    op.create_table(
        "object_tensors",
        sa.Column("object", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(4096), primary_key=True),
        sa.Column("tensor_hash", sa.String(64), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("shape", sa.String(256), nullable=False),
    )
    op.create_index("ix_object_tensors_hash", "object_tensors", ["tensor_hash"])


def downgrade() -> None:
    for table in ("object_tensors", "component_tensors", "hparams", "metrics", "data_segments", "parents",
                  "checkpoint_objects",
                  "locations", "checkpoints", "repositories"):  # fmt: skip
        op.drop_table(table)
