"""Desktop recordings: the recordings table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-05-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types and value sets as of this revision (the models may move on).
_TS = sa.DateTime(timezone=True)
_STATES = ("starting", "recording", "stopping", "finalizing", "available", "failed")
_REASONS = ("ffmpeg-error", "box-death", "max-bytes-exceeded", "display-unavailable", "upload-failed")
_CODECS = ("h264-mp4", "vp9-webm")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("lease_id", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("codec", sa.String(16), nullable=False),
        sa.Column("framerate", sa.Integer(), nullable=False),
        sa.Column("max_seconds", sa.Integer(), nullable=False),
        sa.Column("max_bytes", sa.BigInteger(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=True),
        sa.Column("instance_id", sa.Text(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("storage_key", sa.Text(), nullable=True),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finalized_at", _TS, nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recordings")),
        sa.CheckConstraint(_in("state", _STATES), name=op.f("ck_recordings_state")),
        sa.CheckConstraint(f"reason IS NULL OR {_in('reason', _REASONS)}", name=op.f("ck_recordings_reason")),
        sa.CheckConstraint(_in("codec", _CODECS), name=op.f("ck_recordings_codec")),
    )
    op.create_index(
        "ix_recordings_workspace_id_session_id_created_at", "recordings", ["workspace_id", "session_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_recordings_workspace_id_session_id_created_at", table_name="recordings")
    op.drop_table("recordings")
