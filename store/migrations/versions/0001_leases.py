"""Lease projection: sandbox_leases, sandbox_lease_holders, lease_events.

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types as of this revision (the models may move on).
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sandbox_leases",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("backend", sa.Text(), nullable=False),
        sa.Column("os", sa.Text(), nullable=False),
        sa.Column("liveness", sa.String(16), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("instance_id", sa.Text(), nullable=True),
        sa.Column("envelope", _JSON, nullable=True),
        sa.Column("transition_seq", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("created_at", _TS, server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sandbox_leases")),
        sa.UniqueConstraint("workspace_id", "group_id", name=op.f("uq_sandbox_leases_workspace_id_group_id")),
        sa.CheckConstraint(
            "liveness IN ('cold', 'warming', 'warm', 'draining')", name=op.f("ck_sandbox_leases_liveness")
        ),
    )
    op.create_index(op.f("ix_sandbox_leases_liveness"), "sandbox_leases", ["liveness"])

    op.create_table(
        "sandbox_lease_holders",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("lease_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("holder_id", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("acquired_at", _TS, nullable=False),
        sa.Column("last_heartbeat_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sandbox_lease_holders")),
        sa.ForeignKeyConstraint(
            ["lease_id"],
            ["sandbox_leases.id"],
            name=op.f("fk_sandbox_lease_holders_lease_id_sandbox_leases"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "lease_id", "kind", "holder_id", name=op.f("uq_sandbox_lease_holders_lease_id_kind_holder_id")
        ),
        sa.CheckConstraint(
            "kind IN ('turn', 'viewer', 'direct', 'recording', 'process')",
            name=op.f("ck_sandbox_lease_holders_kind"),
        ),
    )

    op.create_table(
        "lease_events",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("lease_id", sa.Text(), nullable=False),
        sa.Column("transition_seq", sa.BigInteger(), nullable=False),
        sa.Column("from_liveness", sa.String(16), nullable=False),
        sa.Column("to_liveness", sa.String(16), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lease_events")),
        sa.UniqueConstraint("lease_id", "transition_seq", name=op.f("uq_lease_events_lease_id_transition_seq")),
    )


def downgrade() -> None:
    op.drop_table("lease_events")
    op.drop_table("sandbox_lease_holders")
    op.drop_index(op.f("ix_sandbox_leases_liveness"), table_name="sandbox_leases")
    op.drop_table("sandbox_leases")
