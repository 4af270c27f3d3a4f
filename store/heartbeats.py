"""Repository of holder heartbeats: the last-seen marks that keep heartbeats out of the lease history.

A holder's heartbeat is one upsert here (``beats`` + 1, ``last_seen_at``); the lease workflow reads
the rows of its lease only at a holder's deadline (:meth:`HolderHeartbeats.read`, through an
activity) and decides there whether the holder is still alive. Rows of holders nobody has heard
from for a while are pruned by that same read.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from store.database import Database
from store.models import HolderHeartbeatRow, LeaseRow
from store.records import HolderBeatRecord

_BEATS: Table = HolderHeartbeatRow.__table__  # type: ignore[assignment]


class BeatOutcome(NamedTuple):
    """What :meth:`HolderHeartbeats.beat` did: the holder's beat count, or None when refused.

    ``lease_epoch`` is the epoch of the lease's projection (None: not projected yet); a heartbeat
    for an older epoch is not recorded, since the projection's epoch only ever grows.
    """

    beats: int | None
    lease_epoch: int | None


class HolderHeartbeats:
    """Reads and writes ``sandbox_holder_heartbeats``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def beat(self, lease_id: str, kind: str, holder_id: str, epoch: int, at: datetime) -> BeatOutcome:
        """Record one heartbeat of a holder at ``at`` (timezone-aware), unless the lease is past ``epoch``.

        One transaction: the projection's epoch is read, and when it is not above ``epoch`` the
        heartbeat is one upsert (concurrent heartbeats of the same holder each count).
        """
        insert = (postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert)(_BEATS).values(
            lease_id=lease_id, kind=kind, holder_id=holder_id, epoch=epoch, beats=1, last_seen_at=at
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[_BEATS.c.lease_id, _BEATS.c.kind, _BEATS.c.holder_id],
            set_={
                "beats": _BEATS.c.beats + 1,
                "epoch": insert.excluded.epoch,
                "last_seen_at": insert.excluded.last_seen_at,
            },
        ).returning(_BEATS.c.beats)
        async with self._db.sessionmaker.begin() as session:
            lease_epoch = (await session.execute(select(LeaseRow.epoch).where(LeaseRow.id == lease_id))).scalar()
            if lease_epoch is not None and lease_epoch > epoch:
                return BeatOutcome(beats=None, lease_epoch=lease_epoch)
            beats: int = (await session.execute(upsert)).scalar_one()
        return BeatOutcome(beats=beats, lease_epoch=lease_epoch)

    async def read(self, lease_id: str, *, forget_before: datetime | None = None) -> list[HolderBeatRecord]:
        """The marks of a lease's holders, after deleting those last seen before ``forget_before``."""
        async with self._db.sessionmaker.begin() as session:
            if forget_before is not None:
                await session.execute(
                    delete(_BEATS).where(_BEATS.c.lease_id == lease_id, _BEATS.c.last_seen_at < forget_before)
                )
            rows = (
                await session.execute(select(HolderHeartbeatRow).where(HolderHeartbeatRow.lease_id == lease_id))
            ).scalars()
            return [
                HolderBeatRecord(
                    kind=r.kind, holder_id=r.holder_id, epoch=r.epoch, beats=r.beats, last_seen_at=r.last_seen_at
                )
                for r in rows
            ]
