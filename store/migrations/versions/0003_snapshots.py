"""Workspace snapshot ledger: sandbox_snapshots.

Revision ID: 0003
Revises: 0002
Create Date: 2026-05-11
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types and value sets as of this revision (the models may move on).
_TS = sa.DateTime(timezone=True)
_STATES = ("candidate", "current", "previous", "delete_pending", "deleting", "deleted", "delete_failed")
_KINDS = ("tar", "tar+zstd", "native")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "sandbox_snapshots",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("lease_id", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("backend", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("published_at", _TS, nullable=True),
        sa.Column("delete_after", _TS, nullable=True),
        sa.Column("delete_attempts", sa.Integer(), nullable=False),
        sa.Column("last_delete_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", _TS, nullable=True),
        sa.Column("claim_token", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sandbox_snapshots")),
        sa.CheckConstraint(_in("state", _STATES), name=op.f("ck_sandbox_snapshots_state")),
        sa.CheckConstraint(_in("kind", _KINDS), name=op.f("ck_sandbox_snapshots_kind")),
    )
    # Each lease keeps at most one current and one previous archive, enforced by the database.
    for state in ("current", "previous"):
        op.create_index(
            f"uq_sandbox_snapshots_{state}_per_lease",
            "sandbox_snapshots",
            ["lease_id"],
            unique=True,
            sqlite_where=sa.text(f"state = '{state}'"),
            postgresql_where=sa.text(f"state = '{state}'"),
        )
    op.create_index("ix_sandbox_snapshots_workspace_id_group_id", "sandbox_snapshots", ["workspace_id", "group_id"])
    op.create_index("ix_sandbox_snapshots_state_next_attempt_at", "sandbox_snapshots", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_sandbox_snapshots_state_next_attempt_at", table_name="sandbox_snapshots")
    op.drop_index("ix_sandbox_snapshots_workspace_id_group_id", table_name="sandbox_snapshots")
    op.drop_index("uq_sandbox_snapshots_previous_per_lease", table_name="sandbox_snapshots")
    op.drop_index("uq_sandbox_snapshots_current_per_lease", table_name="sandbox_snapshots")
    op.drop_table("sandbox_snapshots")
