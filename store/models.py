"""SQLAlchemy models of the store (the projection the lease workflow writes through an activity).

The schema itself is owned by the Alembic migrations in ``store/migrations``; these models must
match them. Constraint names come from :data:`NAMING_CONVENTION`, so migrations can refer to
them by name on both SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

LIVENESS_VALUES: tuple[str, ...] = ("cold", "warming", "warm", "draining")
"""Allowed values of ``sandbox_leases.liveness``."""

HOLDER_KINDS: tuple[str, ...] = ("turn", "viewer", "direct", "recording", "process")
"""Allowed values of ``sandbox_lease_holders.kind``."""


def _in_check(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


LIVENESS_CHECK = _in_check("liveness", LIVENESS_VALUES)
HOLDER_KIND_CHECK = _in_check("kind", HOLDER_KINDS)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect.

    PostgreSQL stores ``timestamptz``; SQLite has no time zone support, so the value is stored
    as naive UTC and marked UTC again when read. Naive datetimes are refused on write, because
    guessing their zone would silently shift them.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: store only timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def json_type() -> JSON:
    """JSON on SQLite, JSONB on PostgreSQL; Python ``None`` is stored as SQL NULL."""
    return JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def big_id_type() -> BigInteger:
    """A 64-bit surrogate key that still autoincrements on SQLite (``INTEGER PRIMARY KEY``)."""
    return BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base with the naming convention shared by every table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: json_type()}


class LeaseRow(Base):
    """One row per lease: its latest projected state (``sandbox_leases``)."""

    __tablename__ = "sandbox_leases"
    __table_args__ = (
        UniqueConstraint("workspace_id", "group_id"),
        CheckConstraint(LIVENESS_CHECK, name="liveness"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    workspace_id: Mapped[str] = mapped_column(Text)
    group_id: Mapped[str] = mapped_column(Text)
    backend: Mapped[str] = mapped_column(Text)
    os: Mapped[str] = mapped_column(Text)
    liveness: Mapped[str] = mapped_column(String(16), index=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    instance_id: Mapped[str | None] = mapped_column(Text)
    envelope: Mapped[dict[str, Any] | None]
    transition_seq: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(server_default=func.current_timestamp())

    holders: Mapped[list[LeaseHolderRow]] = relationship(
        back_populates="lease",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="raise",
        order_by=lambda: [LeaseHolderRow.acquired_at, LeaseHolderRow.kind, LeaseHolderRow.holder_id],
    )


class LeaseHolderRow(Base):
    """One holder of a lease (``sandbox_lease_holders``); replaced wholesale on each applied transition."""

    __tablename__ = "sandbox_lease_holders"
    __table_args__ = (
        UniqueConstraint("lease_id", "kind", "holder_id"),
        CheckConstraint(HOLDER_KIND_CHECK, name="kind"),
    )

    id: Mapped[int] = mapped_column(big_id_type(), primary_key=True, autoincrement=True)
    lease_id: Mapped[str] = mapped_column(Text, ForeignKey("sandbox_leases.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    holder_id: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    acquired_at: Mapped[datetime]
    last_heartbeat_at: Mapped[datetime]

    lease: Mapped[LeaseRow] = relationship(back_populates="holders", lazy="raise")


class LeaseEventRow(Base):
    """One liveness transition of a lease (``lease_events``); history, kept after the lease row changes."""

    __tablename__ = "lease_events"
    __table_args__ = (UniqueConstraint("lease_id", "transition_seq"),)

    id: Mapped[int] = mapped_column(big_id_type(), primary_key=True, autoincrement=True)
    lease_id: Mapped[str] = mapped_column(Text)
    transition_seq: Mapped[int] = mapped_column(BigInteger)
    from_liveness: Mapped[str] = mapped_column(String(16))
    to_liveness: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime]


ENROLLMENT_STATUSES: tuple[str, ...] = ("pending", "active", "revoked")
"""Allowed values of ``enrollments.status``."""

ENROLLMENT_EXPOSURES: tuple[str, ...] = ("workspace", "whole-machine")
"""Allowed values of ``enrollments.exposure``."""


class EnrollmentRow(Base):
    """One selfhosted machine (agent) enrolled in a workspace (``enrollments``)."""

    __tablename__ = "enrollments"
    __table_args__ = (
        CheckConstraint(_in_check("status", ENROLLMENT_STATUSES), name="status"),
        CheckConstraint(_in_check("exposure", ENROLLMENT_EXPOSURES), name="exposure"),
    )

    workspace_id: Mapped[str] = mapped_column(Text, primary_key=True)
    agent_id: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    exposure: Mapped[str] = mapped_column(String(16))
    allow_screen_control: Mapped[bool]
    has_display: Mapped[bool]
    hostname: Mapped[str | None] = mapped_column(Text)
    os: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    went_offline_at: Mapped[datetime | None]
    went_offline_reason: Mapped[str | None] = mapped_column(Text)
    revoked_at: Mapped[datetime | None]
    # Public halves only (the machine holds the secrets): what NATS lists, and the reply key's id.
    nats_public_key: Mapped[str | None] = mapped_column(Text)
    reply_key_id: Mapped[str | None] = mapped_column(Text)


class SessionPointerRow(Base):
    """Where a session's ops go right now (``session_pointers``); swapped by compare-and-set on the epoch."""

    __tablename__ = "session_pointers"

    session_id: Mapped[str] = mapped_column(Text, primary_key=True)
    active_sandbox_id: Mapped[str | None] = mapped_column(Text)
    active_epoch: Mapped[int] = mapped_column(BigInteger)
    working_dir: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime]


SNAPSHOT_STATES: tuple[str, ...] = (
    "candidate",
    "current",
    "previous",
    "delete_pending",
    "deleting",
    "deleted",
    "delete_failed",
)
"""Allowed values of ``sandbox_snapshots.state`` (the life of one workspace archive)."""

SNAPSHOT_KINDS: tuple[str, ...] = ("tar", "tar+zstd", "native")
"""Allowed values of ``sandbox_snapshots.kind``."""


class SnapshotRow(Base):
    """One workspace archive of a lease (``sandbox_snapshots``): the ledger the snapshot GC works from.

    A lease has at most one ``current`` and one ``previous`` row (partial unique indexes); rows in
    ``deleting`` carry the GC claim (``claim_token``, expiring at ``next_attempt_at``).
    """

    __tablename__ = "sandbox_snapshots"
    __table_args__ = (
        CheckConstraint(_in_check("state", SNAPSHOT_STATES), name="state"),
        CheckConstraint(_in_check("kind", SNAPSHOT_KINDS), name="kind"),
        Index(
            "uq_sandbox_snapshots_current_per_lease",
            "lease_id",
            unique=True,
            sqlite_where=text("state = 'current'"),
            postgresql_where=text("state = 'current'"),
        ),
        Index(
            "uq_sandbox_snapshots_previous_per_lease",
            "lease_id",
            unique=True,
            sqlite_where=text("state = 'previous'"),
            postgresql_where=text("state = 'previous'"),
        ),
        Index("ix_sandbox_snapshots_workspace_id_group_id", "workspace_id", "group_id"),
        Index("ix_sandbox_snapshots_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    lease_id: Mapped[str] = mapped_column(Text)
    workspace_id: Mapped[str] = mapped_column(Text)
    group_id: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    backend: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    published_at: Mapped[datetime | None]
    delete_after: Mapped[datetime | None]
    delete_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_delete_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    claim_token: Mapped[str | None] = mapped_column(Text)


RECORDING_STATES: tuple[str, ...] = ("starting", "recording", "stopping", "finalizing", "available", "failed")
"""Allowed values of ``recordings.state``."""

RECORDING_REASONS: tuple[str, ...] = (
    "ffmpeg-error",
    "box-death",
    "max-bytes-exceeded",
    "display-unavailable",
    "upload-failed",
)
"""Allowed values of ``recordings.reason`` (NULL unless the recording failed)."""

RECORDING_CODECS: tuple[str, ...] = ("h264-mp4", "vp9-webm")
"""Allowed values of ``recordings.codec``."""


class RecordingRow(Base):
    """One desktop recording (``recordings``), projected by its recording workflow.

    ``version`` orders the workflow's writes: a retried or late write never overwrites a newer one.
    ``storage_key``, ``size_bytes`` and ``sha256`` are set when the recording is ``available``.
    """

    __tablename__ = "recordings"
    __table_args__ = (
        CheckConstraint(_in_check("state", RECORDING_STATES), name="state"),
        CheckConstraint(f"reason IS NULL OR {_in_check('reason', RECORDING_REASONS)}", name="reason"),
        CheckConstraint(_in_check("codec", RECORDING_CODECS), name="codec"),
        Index("ix_recordings_workspace_id_session_id_created_at", "workspace_id", "session_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    workspace_id: Mapped[str] = mapped_column(Text)
    session_id: Mapped[str] = mapped_column(Text)
    group_id: Mapped[str] = mapped_column(Text)
    lease_id: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    codec: Mapped[str] = mapped_column(String(16))
    framerate: Mapped[int] = mapped_column(Integer)
    max_seconds: Mapped[int] = mapped_column(Integer)
    max_bytes: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int | None] = mapped_column(BigInteger)
    instance_id: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    storage_key: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finalized_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class HolderHeartbeatRow(Base):
    """The last-seen mark of one lease holder (``sandbox_holder_heartbeats``), written by its heartbeats.

    Kept outside the lease's history on purpose: a heartbeat bumps ``beats`` here and the lease
    workflow reads the row only at the holder's deadline. No foreign key: a holder may beat before
    the lease's projection row exists.
    """

    __tablename__ = "sandbox_holder_heartbeats"

    lease_id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    holder_id: Mapped[str] = mapped_column(Text, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    beats: Mapped[int] = mapped_column(BigInteger)
    last_seen_at: Mapped[datetime]
