"""Selfhosted machines and routing: enrollments, session_pointers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types as of this revision (the models may move on).
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "enrollments",
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("exposure", sa.String(16), nullable=False),
        sa.Column("allow_screen_control", sa.Boolean(), nullable=False),
        sa.Column("has_display", sa.Boolean(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=True),
        sa.Column("os", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("last_seen_at", _TS, nullable=True),
        sa.Column("went_offline_at", _TS, nullable=True),
        sa.Column("went_offline_reason", sa.Text(), nullable=True),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("workspace_id", "agent_id", name=op.f("pk_enrollments")),
        sa.CheckConstraint("status IN ('pending', 'active', 'revoked')", name=op.f("ck_enrollments_status")),
        sa.CheckConstraint("exposure IN ('workspace', 'whole-machine')", name=op.f("ck_enrollments_exposure")),
    )

    op.create_table(
        "session_pointers",
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.Column("active_sandbox_id", sa.Text(), nullable=True),
        sa.Column("active_epoch", sa.BigInteger(), nullable=False),
        sa.Column("working_dir", sa.Text(), nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_session_pointers")),
    )


def downgrade() -> None:
    op.drop_table("session_pointers")
    op.drop_table("enrollments")
