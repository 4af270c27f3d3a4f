"""Repository of the lease projection: the rows the lease workflow's activity writes after each transition.

The lease workflow is the single writer of lease state, but its projection activity can be
retried, delayed or overtaken by a later transition's activity. :meth:`LeaseRepository.apply`
therefore keeps a row only if it is newer (a higher ``transition_seq``) than the stored one, with
the check done by the database inside the upsert itself so concurrent writers cannot race.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import selectinload

from sandbox.errors import InvalidRequest
from store.database import Database
from store.models import LeaseEventRow, LeaseHolderRow, LeaseRow
from store.records import HolderRecord, LeaseEventRecord, LeaseRecord

_LEASES: Table = LeaseRow.__table__  # type: ignore[assignment]
_HOLDERS: Table = LeaseHolderRow.__table__  # type: ignore[assignment]
_EVENTS: Table = LeaseEventRow.__table__  # type: ignore[assignment]

# Columns an applied transition overwrites (everything but the key and the creation time).
_UPDATED_COLUMNS = (
    "workspace_id",
    "group_id",
    "backend",
    "os",
    "liveness",
    "epoch",
    "instance_id",
    "envelope",
    "transition_seq",
    "reason",
    "updated_at",
)


class LeaseRepository:
    """Reads and writes the lease projection (``sandbox_leases``, its holders and ``lease_events``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        if self._db.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    async def apply(self, record: LeaseRecord, events: Sequence[LeaseEventRecord] = ()) -> bool:
        """Store ``record`` if it is newer than the stored lease, and add ``events``, in one transaction.

        The lease row (and its holder rows, replaced wholesale) is written only when the lease is
        absent or ``record.transition_seq`` is greater than the stored one, so a late or repeated
        write never overwrites a newer transition. Events are inserted either way and skipped if
        their ``(lease_id, transition_seq)`` is already stored. Returns whether the lease row was
        written. Raises :class:`InvalidRequest` if an event belongs to another lease, and
        ``sqlalchemy.exc.IntegrityError`` for values the schema refuses (unknown liveness or
        holder kind, a workspace/group already bound to another lease id).
        """
        for ev in events:
            if ev.lease_id != record.lease_id:
                raise InvalidRequest(
                    f"event {ev.transition_seq} belongs to lease {ev.lease_id!r}, not {record.lease_id!r}"
                )
        values: dict[str, Any] = {
            "id": record.lease_id,
            "workspace_id": record.workspace_id,
            "group_id": record.group_id,
            "backend": record.backend,
            "os": record.os,
            "liveness": record.liveness,
            "epoch": record.epoch,
            "instance_id": record.instance_id,
            "envelope": record.envelope,
            "transition_seq": record.transition_seq,
            "reason": record.reason,
            "updated_at": record.updated_at,
        }
        insert = self._insert(_LEASES).values(values)
        # The WHERE is evaluated on the row after the conflicting writer commits (PostgreSQL locks
        # it; SQLite has one writer at a time), so the newest transition wins under concurrency.
        upsert = insert.on_conflict_do_update(
            index_elements=[_LEASES.c.id],
            set_={name: insert.excluded[name] for name in _UPDATED_COLUMNS},
            where=_LEASES.c.transition_seq < insert.excluded.transition_seq,
        ).returning(_LEASES.c.id)

        async with self._db.sessionmaker.begin() as session:
            applied = (await session.execute(upsert)).scalar_one_or_none() is not None
            if applied:
                await session.execute(delete(_HOLDERS).where(_HOLDERS.c.lease_id == record.lease_id))
                if record.holders:
                    await session.execute(
                        _HOLDERS.insert(),
                        [
                            {
                                "lease_id": record.lease_id,
                                "kind": h.kind,
                                "holder_id": h.holder_id,
                                "subject": h.subject,
                                "acquired_at": h.acquired_at,
                                "last_heartbeat_at": h.last_heartbeat_at,
                            }
                            for h in record.holders
                        ],
                    )
            if events:
                await session.execute(
                    self._insert(_EVENTS).on_conflict_do_nothing(
                        index_elements=[_EVENTS.c.lease_id, _EVENTS.c.transition_seq]
                    ),
                    [ev.model_dump() for ev in events],
                )
        return applied

    async def get(self, workspace_id: str, group_id: str) -> LeaseRecord | None:
        """The stored lease of a workspace's sandbox group, with its holders, or None."""
        stmt = (
            select(LeaseRow)
            .where(LeaseRow.workspace_id == workspace_id, LeaseRow.group_id == group_id)
            .options(selectinload(LeaseRow.holders))
        )
        async with self._db.sessionmaker() as session:
            row = (await session.execute(stmt)).scalar_one_or_none()
            return None if row is None else _lease_record(row)

    async def get_by_id(self, lease_id: str) -> LeaseRecord | None:
        """The stored lease with this id, with its holders, or None."""
        stmt = select(LeaseRow).where(LeaseRow.id == lease_id).options(selectinload(LeaseRow.holders))
        async with self._db.sessionmaker() as session:
            row = (await session.execute(stmt)).scalar_one_or_none()
            return None if row is None else _lease_record(row)

    async def list(
        self, liveness: str | None = None, workspace_id: str | None = None, limit: int = 1000
    ) -> builtins.list[LeaseRecord]:
        """Stored leases with their holders, optionally filtered, ordered by workspace then group.

        Raises :class:`InvalidRequest` if ``limit`` is not positive.
        """
        if limit <= 0:
            raise InvalidRequest(f"limit must be positive, got {limit}")
        stmt = select(LeaseRow).options(selectinload(LeaseRow.holders))
        if liveness is not None:
            stmt = stmt.where(LeaseRow.liveness == liveness)
        if workspace_id is not None:
            stmt = stmt.where(LeaseRow.workspace_id == workspace_id)
        stmt = stmt.order_by(LeaseRow.workspace_id, LeaseRow.group_id).limit(limit)
        async with self._db.sessionmaker() as session:
            return [_lease_record(row) for row in (await session.execute(stmt)).scalars()]

    async def events(self, lease_id: str, limit: int = 100) -> builtins.list[LeaseEventRecord]:
        """The lease's stored events, newest (highest ``transition_seq``) first.

        Raises :class:`InvalidRequest` if ``limit`` is not positive.
        """
        if limit <= 0:
            raise InvalidRequest(f"limit must be positive, got {limit}")
        stmt = (
            select(LeaseEventRow)
            .where(LeaseEventRow.lease_id == lease_id)
            .order_by(LeaseEventRow.transition_seq.desc())
            .limit(limit)
        )
        async with self._db.sessionmaker() as session:
            return [
                LeaseEventRecord(
                    lease_id=row.lease_id,
                    transition_seq=row.transition_seq,
                    from_liveness=row.from_liveness,
                    to_liveness=row.to_liveness,
                    epoch=row.epoch,
                    reason=row.reason,
                    at=row.at,
                )
                for row in (await session.execute(stmt)).scalars()
            ]


def _lease_record(row: LeaseRow) -> LeaseRecord:
    return LeaseRecord(
        lease_id=row.id,
        workspace_id=row.workspace_id,
        group_id=row.group_id,
        backend=row.backend,
        os=row.os,
        liveness=row.liveness,
        epoch=row.epoch,
        instance_id=row.instance_id,
        envelope=row.envelope,
        transition_seq=row.transition_seq,
        reason=row.reason,
        updated_at=row.updated_at,
        holders=[
            HolderRecord(
                kind=h.kind,
                holder_id=h.holder_id,
                subject=h.subject,
                acquired_at=h.acquired_at,
                last_heartbeat_at=h.last_heartbeat_at,
            )
            for h in row.holders
        ],
    )
