"""The live loop (issue #17): a traffic share on aliases, live metrics per version, the reasons
of automatic alias moves, and continual train jobs.

- ``aliases.traffic``: the share of requests routed to the alias (the ``candidate`` canary);
  NULL for an alias that serves no share (``production`` serves what the canary does not).
- ``alias_events.traffic`` and ``alias_events.detail``: the share after the move, and the evidence
  of an automatic move (live τ of both sides, cycles, the bound).
- ``live_metrics``: the counters each inference instance reports per version (deltas, one row per
  report; ``(version_id, instance, seq)`` is unique so a retried report counts once).
- ``train_jobs.continual`` (the schedule and its state) and ``train_jobs.parent_id`` (a round's
  continual job).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("aliases") as batch:
        batch.add_column(sa.Column("traffic", sa.Float(), nullable=True))
    with op.batch_alter_table("alias_events") as batch:
        batch.add_column(sa.Column("traffic", sa.Float(), nullable=True))
        batch.add_column(sa.Column("detail", sa.JSON(), nullable=True))
    with op.batch_alter_table("train_jobs") as batch:
        batch.add_column(sa.Column("continual", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("parent_id", sa.String(length=36), nullable=True))
        batch.create_index(op.f("ix_train_jobs_parent_id"), ["parent_id"])
    op.create_table(
        "live_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("instance", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("cycles", sa.BigInteger(), nullable=False),
        sa.Column("accepted", sa.BigInteger(), nullable=False),
        sa.Column("accepted_sq", sa.BigInteger(), nullable=False),
        sa.Column("generated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("decode_s", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["versions.id"],
            name=op.f("fk_live_metrics_version_id_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_live_metrics")),
        sa.UniqueConstraint(
            "version_id", "instance", "seq", name=op.f("uq_live_metrics_version_id_instance_seq")
        ),
    )
    op.create_index(
        op.f("ix_live_metrics_version_id_created_at"), "live_metrics", ["version_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_live_metrics_version_id_created_at"), table_name="live_metrics")
    op.drop_table("live_metrics")
    with op.batch_alter_table("train_jobs") as batch:
        batch.drop_index(op.f("ix_train_jobs_parent_id"))
        batch.drop_column("parent_id")
        batch.drop_column("continual")
    with op.batch_alter_table("alias_events") as batch:
        batch.drop_column("detail")
        batch.drop_column("traffic")
    with op.batch_alter_table("aliases") as batch:
        batch.drop_column("traffic")
