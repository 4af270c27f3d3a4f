"""The snapshot ledger on real databases: SQLite (a file) and PostgreSQL (the shared test server)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from sandbox.errors import InvalidRequest, SnapshotConflict, SnapshotNotFound
from store.database import Database
from store.models import Base, SnapshotRow
from store.snapshots import GcPolicy, SnapshotLedger, SnapshotRecord
from tests.conftest import fresh_postgres_database, migrated_store

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
LEASE = "lease/ws1/g1"


@pytest.fixture(scope="module")
def pg_snapshots_url(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped afterwards."""
    with fresh_postgres_database(postgres_url, "snapshots_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_snapshots_url")
    async with migrated_store(url, empty=("sandbox_snapshots",)) as database:
        yield database


@pytest.fixture
def ledger(db: Database) -> SnapshotLedger:
    return SnapshotLedger(db, clock=lambda: T0)


async def captured(
    ledger: SnapshotLedger, minutes: float, *, lease: str = LEASE, sha: str | None = None, epoch: int = 1
) -> SnapshotRecord:
    """A complete candidate whose capture started ``minutes`` after T0."""
    ws, group = lease.split("/")[1:]
    record = await ledger.record_candidate(
        lease_id=lease,
        workspace_id=ws,
        group_id=group,
        epoch=epoch,
        key=f"snapshots/{ws}/{group}/{secrets.token_hex(4)}.tar",
        kind="tar",
        backend="local",
        created_at=T0 + timedelta(minutes=minutes),
    )
    return await ledger.complete_candidate(record.snapshot_id, sha256=sha or secrets.token_hex(32), size_bytes=10)


async def states(ledger: SnapshotLedger, lease: str = LEASE) -> dict[str, str]:
    ws, group = lease.split("/")[1:]
    return {r.snapshot_id: r.state for r in await ledger.list(ws, group)}


def _diff(conn: Connection) -> list[object]:
    diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    return [d for d in diff if SnapshotRow.__tablename__ in repr(d)]


async def test_migration_matches_the_model(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_five_publishes_keep_exactly_current_and_previous(ledger: SnapshotLedger) -> None:
    records = [await captured(ledger, minutes=i) for i in range(5)]
    for record in records:
        slots = await ledger.publish(LEASE, record.snapshot_id, now=T0 + timedelta(hours=1))
        assert slots[0].snapshot_id == record.snapshot_id
    ids = [r.snapshot_id for r in records]
    assert [s.snapshot_id for s in await ledger.slots(LEASE)] == [ids[4], ids[3]]
    assert await states(ledger) == {
        ids[0]: "delete_pending",
        ids[1]: "delete_pending",
        ids[2]: "delete_pending",
        ids[3]: "previous",
        ids[4]: "current",
    }
    claims = await ledger.claim_for_gc(now=T0 + timedelta(hours=2))
    assert {c.snapshot_id for c in claims} == set(ids[:3])
    for claim in claims:
        assert await ledger.settle(claim, now=T0 + timedelta(hours=2)) == "deleted"
    remaining = {sid: s for sid, s in (await states(ledger)).items() if s != "deleted"}
    assert remaining == {ids[3]: "previous", ids[4]: "current"}
    # Nothing more to collect, ever, while they stay referenced.
    assert await ledger.claim_for_gc(now=T0 + timedelta(days=400)) == []


async def test_publish_is_idempotent_and_refuses_what_it_must(ledger: SnapshotLedger) -> None:
    first = await captured(ledger, minutes=10)
    assert [s.snapshot_id for s in await ledger.publish(LEASE, first.snapshot_id)] == [first.snapshot_id]
    assert [s.snapshot_id for s in await ledger.publish(LEASE, first.snapshot_id)] == [first.snapshot_id]

    late = await captured(ledger, minutes=5)  # started before the current one: stale
    with pytest.raises(SnapshotConflict, match="captured before"):
        await ledger.publish(LEASE, late.snapshot_id)
    with pytest.raises(SnapshotNotFound):
        await ledger.publish(LEASE, "snap-nope")
    with pytest.raises(SnapshotNotFound):
        await ledger.publish("lease/other/g", first.snapshot_id)

    writing = await ledger.record_candidate(
        lease_id=LEASE, workspace_id="ws1", group_id="g1", epoch=1, key="k/x", kind="tar", backend="local"
    )
    with pytest.raises(SnapshotConflict, match="still being written"):
        await ledger.publish(LEASE, writing.snapshot_id)
    with pytest.raises(InvalidRequest):
        await ledger.record_candidate(
            lease_id=LEASE, workspace_id="ws1", group_id="g1", epoch=1, key="k/y", kind="zip", backend="local"
        )
    assert [s.snapshot_id for s in await ledger.slots(LEASE)] == [first.snapshot_id]


async def test_the_database_allows_one_current_and_one_previous_per_lease(db: Database) -> None:
    now = T0.isoformat(sep=" ") if db.dialect == "sqlite" else T0
    row = (
        "INSERT INTO sandbox_snapshots (id, lease_id, workspace_id, group_id, epoch, state, key, kind, backend, "
        "created_at, delete_attempts) VALUES (:id, 'lease/a/b', 'a', 'b', 1, :state, 'k', 'tar', 'local', :at, 0)"
    )
    async with db.engine.begin() as conn:
        await conn.execute(text(row), {"id": "s1", "state": "current", "at": now})
        await conn.execute(text(row), {"id": "s2", "state": "previous", "at": now})
    for state in ("current", "previous"):
        with pytest.raises(IntegrityError):
            async with db.engine.begin() as conn:
                await conn.execute(text(row), {"id": f"dup-{state}", "state": state, "at": now})


async def test_concurrent_publishes_of_one_lease_leave_one_current(ledger: SnapshotLedger) -> None:
    records = [await captured(ledger, minutes=i) for i in range(8)]
    results = await asyncio.gather(*(ledger.publish(LEASE, r.snapshot_id) for r in records), return_exceptions=True)
    assert all(isinstance(r, list | SnapshotConflict) for r in results), results
    by_state: dict[str, int] = {}
    for state in (await states(ledger)).values():
        by_state[state] = by_state.get(state, 0) + 1
    assert by_state.get("current") == 1
    assert by_state.get("previous", 0) <= 1


async def test_gc_never_claims_current_or_previous_and_claims_are_disjoint(ledger: SnapshotLedger) -> None:
    for lease in (f"lease/ws{i}/g" for i in range(6)):
        for minute in range(4):
            record = await captured(ledger, minutes=minute, lease=lease)
            await ledger.publish(lease, record.snapshot_id)
    later = T0 + timedelta(hours=1)
    policy = GcPolicy(batch_size=3)
    batches = await asyncio.gather(*(ledger.claim_for_gc(policy=policy, now=later) for _ in range(8)))
    claimed = [c.snapshot_id for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed)) == 12, "each delete_pending row claimed exactly once"
    assert all(len(batch) <= 3 for batch in batches)
    for lease in (f"lease/ws{i}/g" for i in range(6)):
        assert {s.state for s in await ledger.slots(lease)} == {"current", "previous"}


async def test_a_delete_that_fails_backs_off_and_succeeds_later(ledger: SnapshotLedger) -> None:
    old, cur, new = [await captured(ledger, minutes=i) for i in range(3)]
    for record in (old, cur, new):
        await ledger.publish(LEASE, record.snapshot_id)
    policy = GcPolicy(backoff_base_seconds=10, backoff_max_seconds=25)
    t = T0 + timedelta(hours=1)

    (claim,) = await ledger.claim_for_gc(policy=policy, now=t)
    assert await ledger.settle(claim, error="disk on fire", policy=policy, now=t) == "delete_failed"
    assert await ledger.claim_for_gc(policy=policy, now=t + timedelta(seconds=9)) == []
    (claim,) = await ledger.claim_for_gc(policy=policy, now=t + timedelta(seconds=10))
    t += timedelta(seconds=10)
    assert await ledger.settle(claim, error="still on fire", policy=policy, now=t) == "delete_failed"
    row = await ledger.get(old.snapshot_id)
    assert row is not None
    assert (row.delete_attempts, row.last_delete_error) == (2, "still on fire")
    assert row.next_attempt_at == t + timedelta(seconds=20)  # 10 s × 2
    assert await ledger.claim_for_gc(policy=policy, now=t + timedelta(seconds=19)) == []
    (claim,) = await ledger.claim_for_gc(policy=policy, now=t + timedelta(seconds=20))
    assert await ledger.settle(claim, policy=policy, now=t + timedelta(seconds=20)) == "deleted"
    assert policy.backoff(10) == timedelta(seconds=25), "backoff is capped"


async def test_abandoned_claims_and_unpublished_candidates_are_collected(ledger: SnapshotLedger) -> None:
    policy = GcPolicy(claim_ttl_seconds=60, candidate_ttl_seconds=600)
    orphan = await captured(ledger, minutes=0)  # never published
    assert await ledger.claim_for_gc(policy=policy, now=T0 + timedelta(seconds=599)) == []
    (first,) = await ledger.claim_for_gc(policy=policy, now=T0 + timedelta(seconds=600))
    assert first.snapshot_id == orphan.snapshot_id
    # The first claimer dies; after the claim TTL another run takes the row over.
    assert await ledger.claim_for_gc(policy=policy, now=T0 + timedelta(seconds=659)) == []
    (second,) = await ledger.claim_for_gc(policy=policy, now=T0 + timedelta(seconds=660))
    assert second.claim_token != first.claim_token
    assert await ledger.settle(first, now=T0 + timedelta(seconds=661)) is None, "a stale claim settles nothing"
    assert await ledger.settle(second, now=T0 + timedelta(seconds=661)) == "deleted"
    # A collected candidate can no longer be completed or published.
    with pytest.raises(SnapshotConflict):
        await ledger.publish(LEASE, orphan.snapshot_id)
    with pytest.raises(SnapshotConflict):
        await ledger.complete_candidate(orphan.snapshot_id, sha256="0" * 64, size_bytes=1)


async def test_abandoned_candidates_and_old_tombstones_leave_no_row(ledger: SnapshotLedger) -> None:
    policy = GcPolicy(tombstone_ttl_seconds=3600)
    never_stored = await ledger.record_candidate(
        lease_id=LEASE, workspace_id="ws1", group_id="g1", epoch=1, key="k/z", kind="tar", backend="local"
    )
    assert await ledger.abandon_candidate(never_stored.snapshot_id, object_deleted=True, now=T0)
    assert await ledger.get(never_stored.snapshot_id) is None
    kept_object = await captured(ledger, minutes=0)
    assert await ledger.abandon_candidate(kept_object.snapshot_id, object_deleted=False, now=T0)
    (claim,) = await ledger.claim_for_gc(policy=policy, now=T0)
    assert await ledger.settle(claim, now=T0) == "deleted"
    assert await ledger.prune_tombstones(policy=policy, now=T0 + timedelta(seconds=3599)) == 0
    assert await ledger.prune_tombstones(policy=policy, now=T0 + timedelta(seconds=3600)) == 1
    assert await ledger.get(kept_object.snapshot_id) is None


async def test_list_counts_and_find_published(ledger: SnapshotLedger) -> None:
    a = await captured(ledger, minutes=1, sha="a" * 64)
    b = await captured(ledger, minutes=2, sha="b" * 64)
    await ledger.publish(LEASE, a.snapshot_id)
    await ledger.publish(LEASE, b.snapshot_id)
    listed = await ledger.list("ws1", "g1")
    assert [r.snapshot_id for r in listed] == [b.snapshot_id, a.snapshot_id]
    assert listed[0].created_at == T0 + timedelta(minutes=2)
    assert await ledger.counts() == {"current": 1, "previous": 1}
    found = await ledger.find_published(LEASE, "a" * 64)
    assert found is not None and found.snapshot_id == a.snapshot_id
    assert await ledger.find_published(LEASE, "c" * 64) is None
    with pytest.raises(InvalidRequest):
        await ledger.list("ws1", "g1", limit=0)
