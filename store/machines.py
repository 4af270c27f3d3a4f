"""Repositories for selfhosted machines and session routing: ``enrollments`` and ``session_pointers``.

An *enrollment* says that an agent (a user's machine running ``sandboxctl agent run``) belongs to a
workspace, with what exposure and consent, and when it was last seen; liveness is derived from it
by :func:`sandbox.liveness.selfhosted_liveness`. A *session pointer* says where a session's ops go
right now, ``(active_sandbox_id, active_epoch, working_dir)``; it only ever moves by
compare-and-set on ``active_epoch`` (:meth:`SessionPointerRepository.swap`), checked by the
database inside the write itself, so two racing swaps can never both win.
"""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite

from sandbox.control_protocol import validate_agent_token
from sandbox.errors import InvalidRequest, StaleEpoch
from sandbox.liveness import EnrollmentView
from sandbox.nats_auth import AgentNatsUser
from sandbox.routing import ActivePointer
from store.database import Database
from store.models import ENROLLMENT_EXPOSURES, EnrollmentRow, SessionPointerRow
from store.records import UtcDatetime

__all__ = [
    "EnrollmentRecord",
    "EnrollmentRepository",
    "Exposure",
    "SessionPointerRepository",
]

_ENROLLMENTS: Table = EnrollmentRow.__table__  # type: ignore[assignment]
_POINTERS: Table = SessionPointerRow.__table__  # type: ignore[assignment]

Exposure = Literal["workspace", "whole-machine"]


def _now() -> datetime:
    return datetime.now(UTC)


class EnrollmentRecord(BaseModel):
    """One enrolled machine as stored.

    Attributes:
        workspace_id: The workspace the machine serves.
        agent_id: The agent's id (a NATS subject token).
        status: pending | active | revoked.
        exposure: ``workspace`` (a directory) or ``whole-machine``.
        allow_screen_control: The owner consented to desktop input.
        has_display: The machine has a display (as last reported).
        hostname: As the agent last reported it.
        os: linux | macos | windows, as last reported.
        created_at: First enrollment.
        updated_at: Last change of this row.
        last_seen_at: The last time the agent answered.
        went_offline_at: Set when the agent was seen going away cleanly; cleared when it answers again.
        went_offline_reason: Why it went away.
        revoked_at: When it was revoked.
        nats_public_key: The public nkey of the machine's NATS identity (None before credentials existed).
        reply_key_id: Id of the machine's reply-signing key (its certificate names the key itself).
    """

    model_config = ConfigDict(frozen=True)

    workspace_id: str
    agent_id: str
    status: str
    exposure: str
    allow_screen_control: bool
    has_display: bool
    hostname: str | None = None
    os: str | None = None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    last_seen_at: UtcDatetime | None = None
    went_offline_at: UtcDatetime | None = None
    went_offline_reason: str | None = None
    revoked_at: UtcDatetime | None = None
    nats_public_key: str | None = None
    reply_key_id: str | None = None

    def view(self) -> EnrollmentView:
        """The slice liveness is computed from."""
        return EnrollmentView(
            status=self.status,
            exposure=self.exposure,
            allow_screen_control=self.allow_screen_control,
            has_display=self.has_display,
            last_seen_at=self.last_seen_at,
            went_offline_at=self.went_offline_at,
            went_offline_reason=self.went_offline_reason,
        )


def _record(row: EnrollmentRow) -> EnrollmentRecord:
    return EnrollmentRecord(
        workspace_id=row.workspace_id,
        agent_id=row.agent_id,
        status=row.status,
        exposure=row.exposure,
        allow_screen_control=row.allow_screen_control,
        has_display=row.has_display,
        hostname=row.hostname,
        os=row.os,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_seen_at=row.last_seen_at,
        went_offline_at=row.went_offline_at,
        went_offline_reason=row.went_offline_reason,
        revoked_at=row.revoked_at,
        nats_public_key=row.nats_public_key,
        reply_key_id=row.reply_key_id,
    )


class EnrollmentRepository:
    """Reads and writes ``enrollments``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _insert(self) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(_ENROLLMENTS) if self._db.dialect == "postgresql" else sqlite.insert(_ENROLLMENTS)

    async def enroll(
        self,
        workspace_id: str,
        agent_id: str,
        *,
        exposure: Exposure = "workspace",
        allow_screen_control: bool = False,
        has_display: bool = False,
        nats_public_key: str | None = None,
        reply_key_id: str | None = None,
        now: datetime | None = None,
    ) -> EnrollmentRecord:
        """Enroll an agent as active (re-enrolling replaces its exposure and consent and lifts a revocation).

        ``nats_public_key`` and ``reply_key_id`` are the public halves of a credential issued for
        this enrollment; re-enrolling with new ones replaces the old (whose NATS identity stops working).

        Raises:
            InvalidRequest: an id cannot be a subject token, or an unknown exposure.
        """
        validate_agent_token(workspace_id, "workspace id")
        validate_agent_token(agent_id, "agent id")
        if exposure not in ENROLLMENT_EXPOSURES:
            raise InvalidRequest(f"exposure must be one of {', '.join(ENROLLMENT_EXPOSURES)}, not {exposure!r}")
        at = now or _now()
        values = {
            "workspace_id": workspace_id,
            "agent_id": agent_id,
            "status": "active",
            "exposure": exposure,
            "allow_screen_control": allow_screen_control,
            "has_display": has_display,
            "created_at": at,
            "updated_at": at,
            "revoked_at": None,
            "nats_public_key": nats_public_key,
            "reply_key_id": reply_key_id,
        }
        insert = self._insert().values(values)
        upsert = insert.on_conflict_do_update(
            index_elements=[_ENROLLMENTS.c.workspace_id, _ENROLLMENTS.c.agent_id],
            set_={
                name: insert.excluded[name]
                for name in (
                    "status",
                    "exposure",
                    "allow_screen_control",
                    "has_display",
                    "updated_at",
                    "revoked_at",
                    "nats_public_key",
                    "reply_key_id",
                )
            },
        )
        async with self._db.sessionmaker.begin() as session:
            await session.execute(upsert)
        record = await self.get(workspace_id, agent_id)
        assert record is not None
        return record

    async def get(self, workspace_id: str, agent_id: str) -> EnrollmentRecord | None:
        """The enrollment of an agent, or None."""
        async with self._db.sessionmaker() as session:
            row = await session.get(EnrollmentRow, (workspace_id, agent_id))
            return None if row is None else _record(row)

    async def list(
        self, workspace_id: str | None = None, *, include_revoked: bool = True
    ) -> builtins.list[EnrollmentRecord]:
        """Enrollments ordered by workspace then agent, optionally of one workspace and without revoked ones."""
        stmt = select(EnrollmentRow).order_by(EnrollmentRow.workspace_id, EnrollmentRow.agent_id)
        if workspace_id is not None:
            stmt = stmt.where(EnrollmentRow.workspace_id == workspace_id)
        if not include_revoked:
            stmt = stmt.where(EnrollmentRow.status != "revoked")
        async with self._db.sessionmaker() as session:
            return [_record(row) for row in (await session.execute(stmt)).scalars()]

    async def nats_users(self) -> builtins.list[AgentNatsUser]:
        """The NATS identities of active enrollments (what the embedded server's config lists)."""
        stmt = select(EnrollmentRow).where(EnrollmentRow.status == "active", EnrollmentRow.nats_public_key.is_not(None))
        async with self._db.sessionmaker() as session:
            rows = (await session.execute(stmt)).scalars()
            return [AgentNatsUser(row.workspace_id, row.agent_id, row.nats_public_key or "") for row in rows]

    async def revoke(self, workspace_id: str, agent_id: str, *, now: datetime | None = None) -> bool:
        """Revoke an enrollment (the agent reads as offline from then on); False if it was not enrolled."""
        at = now or _now()
        stmt = (
            update(_ENROLLMENTS)
            .where(_ENROLLMENTS.c.workspace_id == workspace_id, _ENROLLMENTS.c.agent_id == agent_id)
            .values(status="revoked", revoked_at=at, updated_at=at)
            .returning(_ENROLLMENTS.c.agent_id)
        )
        async with self._db.sessionmaker.begin() as session:
            return (await session.execute(stmt)).scalar_one_or_none() is not None

    async def record_seen(
        self,
        workspace_id: str,
        agent_id: str,
        *,
        now: datetime | None = None,
        hostname: str | None = None,
        os: str | None = None,
        has_display: bool | None = None,
    ) -> bool:
        """Note that the agent answered: ``last_seen_at`` moves forward, a clean goodbye is cleared,
        and what the agent reported about itself is kept. False if it is not enrolled.
        """
        at = now or _now()
        values: dict[str, object] = {"last_seen_at": at, "went_offline_at": None, "went_offline_reason": None}
        if hostname is not None:
            values["hostname"] = hostname
        if os is not None:
            values["os"] = os
        if has_display is not None:
            values["has_display"] = has_display
        stmt = (
            update(_ENROLLMENTS)
            .where(_ENROLLMENTS.c.workspace_id == workspace_id, _ENROLLMENTS.c.agent_id == agent_id)
            .values(values)
            .returning(_ENROLLMENTS.c.agent_id)
        )
        async with self._db.sessionmaker.begin() as session:
            return (await session.execute(stmt)).scalar_one_or_none() is not None

    async def record_offline(
        self, workspace_id: str, agent_id: str, reason: str, *, now: datetime | None = None
    ) -> bool:
        """Note a clean goodbye (the agent reads as offline until it answers again)."""
        at = now or _now()
        stmt = (
            update(_ENROLLMENTS)
            .where(_ENROLLMENTS.c.workspace_id == workspace_id, _ENROLLMENTS.c.agent_id == agent_id)
            .values(went_offline_at=at, went_offline_reason=reason)
            .returning(_ENROLLMENTS.c.agent_id)
        )
        async with self._db.sessionmaker.begin() as session:
            return (await session.execute(stmt)).scalar_one_or_none() is not None


class SessionPointerRepository:
    """Reads and compare-and-sets ``session_pointers``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, session_id: str) -> ActivePointer:
        """The session's pointer; a session never swapped points home at epoch 0."""
        async with self._db.sessionmaker() as session:
            row = await session.get(SessionPointerRow, session_id)
        if row is None:
            return ActivePointer(active_sandbox_id=None, active_epoch=0)
        return ActivePointer(
            active_sandbox_id=row.active_sandbox_id, active_epoch=row.active_epoch, working_dir=row.working_dir
        )

    async def swap(
        self,
        session_id: str,
        to_sandbox_id: str | None,
        *,
        expected_epoch: int,
        working_dir: str | None = None,
        now: datetime | None = None,
    ) -> ActivePointer:
        """Point the session at ``to_sandbox_id`` (None = home) under epoch ``expected_epoch + 1``,
        only if its epoch is still ``expected_epoch``.

        Raises:
            StaleEpoch: another swap moved the pointer first; re-read it and decide again.
            InvalidRequest: an empty session id or a negative epoch.
        """
        if not session_id:
            raise InvalidRequest("session id must not be empty")
        if expected_epoch < 0:
            raise InvalidRequest(f"expected epoch must be >= 0, got {expected_epoch}")
        at = now or _now()
        new_epoch = expected_epoch + 1
        values = {
            "active_sandbox_id": to_sandbox_id,
            "active_epoch": new_epoch,
            "working_dir": working_dir,
            "updated_at": at,
        }
        async with self._db.sessionmaker.begin() as session:
            stmt = (
                update(_POINTERS)
                .where(_POINTERS.c.session_id == session_id, _POINTERS.c.active_epoch == expected_epoch)
                .values(values)
                .returning(_POINTERS.c.session_id)
            )
            won = (await session.execute(stmt)).scalar_one_or_none() is not None
            if not won and expected_epoch == 0:
                insert = (postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert)(_POINTERS)
                created = insert.values(session_id=session_id, **values).on_conflict_do_nothing(
                    index_elements=[_POINTERS.c.session_id]
                )
                won = (
                    await session.execute(created.returning(_POINTERS.c.session_id))
                ).scalar_one_or_none() is not None
        if not won:
            current = await self.get(session_id)
            raise StaleEpoch(
                f"session {session_id!r} is at epoch {current.active_epoch}, not {expected_epoch}; "
                "another swap won: re-read the pointer"
            )
        return ActivePointer(active_sandbox_id=to_sandbox_id, active_epoch=new_epoch, working_dir=working_dir)
