"""Holder heartbeat marks (``sandbox_holder_heartbeats``) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from store.database import Database
from store.heartbeats import HolderHeartbeats
from store.leases import LeaseRepository
from tests.integration.store.test_leases import db, db_url, lease, pg_module_url  # noqa: F401 - fixtures

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


async def test_beats_count_up_and_read_back_with_their_latest_time_and_epoch(db: Database) -> None:  # noqa: F811
    beats = HolderHeartbeats(db)
    lease_id = f"lease/ws/{uuid.uuid4().hex[:6]}"
    first = await beats.beat(lease_id, "turn", "t1", 1, T0)
    assert (first.beats, first.lease_epoch) == (1, None)
    await asyncio.gather(*(beats.beat(lease_id, "turn", "t1", 1, T0 + timedelta(seconds=i)) for i in range(1, 11)))
    await beats.beat(lease_id, "viewer", "v1", 1, T0)
    marks = {(m.kind, m.holder_id): m for m in await beats.read(lease_id)}
    assert marks[("turn", "t1")].beats == 11, "every concurrent heartbeat counts"
    assert marks[("turn", "t1")].epoch == 1
    assert T0 < marks[("turn", "t1")].last_seen_at <= T0 + timedelta(seconds=10)
    assert marks[("viewer", "v1")].beats == 1
    assert await beats.read("lease/ws/other") == []


async def test_a_read_forgets_marks_older_than_asked_and_keeps_the_rest(db: Database) -> None:  # noqa: F811
    beats = HolderHeartbeats(db)
    lease_id = f"lease/ws/{uuid.uuid4().hex[:6]}"
    await beats.beat(lease_id, "turn", "old", 1, T0)
    await beats.beat(lease_id, "turn", "fresh", 1, T0 + timedelta(minutes=10))
    kept = await beats.read(lease_id, forget_before=T0 + timedelta(minutes=5))
    assert [m.holder_id for m in kept] == ["fresh"]
    assert [m.holder_id for m in await beats.read(lease_id)] == ["fresh"]


async def test_a_beat_for_an_epoch_the_projection_moved_past_is_not_recorded(db: Database) -> None:  # noqa: F811
    beats = HolderHeartbeats(db)
    record = lease(6, ws="hb", group=uuid.uuid4().hex[:6])  # epoch 3
    await LeaseRepository(db).apply(record)
    ok = await beats.beat(record.lease_id, "turn", "t1", 3, T0)
    assert (ok.beats, ok.lease_epoch) == (1, 3)
    refused = await beats.beat(record.lease_id, "turn", "t1", 2, T0 + timedelta(seconds=1))
    assert (refused.beats, refused.lease_epoch) == (None, 3)
    [mark] = await beats.read(record.lease_id)
    assert (mark.beats, mark.epoch, mark.last_seen_at) == (1, 3, T0)
