"""The lease projection on real databases: SQLite (a file) and PostgreSQL (the shared test server)."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, delete, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from sandbox.errors import InvalidRequest, SandboxConfigError
from sandbox.settings import Settings
from store.database import Database
from store.leases import LeaseRepository
from store.models import Base, LeaseHolderRow, LeaseRow
from store.records import HolderRecord, LeaseEventRecord, LeaseRecord

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
TABLES = {"sandbox_leases", "sandbox_lease_holders", "lease_events"}


def holder(kind: str, holder_id: str, minutes: int = 0, subject: str | None = None) -> HolderRecord:
    at = T0 + timedelta(minutes=minutes)
    return HolderRecord(
        kind=kind, holder_id=holder_id, subject=subject, acquired_at=at, last_heartbeat_at=at + timedelta(seconds=5)
    )


def lease(
    seq: int,
    *,
    ws: str = "ws1",
    group: str = "g1",
    liveness: str = "warm",
    holders: list[HolderRecord] | None = None,
    reason: str = "test",
    envelope: dict[str, object] | None = None,
) -> LeaseRecord:
    return LeaseRecord(
        lease_id=f"lease/{ws}/{group}",
        workspace_id=ws,
        group_id=group,
        backend="local",
        liveness=liveness,
        epoch=seq // 2,
        instance_id=f"box-{seq}" if liveness == "warm" else None,
        envelope=envelope,
        transition_seq=seq,
        reason=reason,
        updated_at=T0 + timedelta(seconds=seq),
        holders=holders or [],
    )


def event(seq: int, lease_id: str = "lease/ws1/g1", reason: str = "test") -> LeaseEventRecord:
    return LeaseEventRecord(
        lease_id=lease_id,
        transition_seq=seq,
        from_liveness="cold",
        to_liveness="warm",
        epoch=seq,
        reason=reason,
        at=T0 + timedelta(seconds=seq),
    )


# --------------------------------------------------------------------------- fixtures


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def pg_module_url(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped afterwards."""
    name = f"store_test_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_module_url")
    return url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(db_url)
    await database.migrate()
    if database.dialect == "postgresql":
        # One database per module: start every test from empty tables.
        async with database.engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {', '.join(sorted(TABLES))}"))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def repo(db: Database) -> LeaseRepository:
    return LeaseRepository(db)


# --------------------------------------------------------------------------- schema


def _schema_facts(conn: Connection) -> tuple[set[str], str, list[object]]:
    tables = set(inspect(conn).get_table_names())
    version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    return tables, version, diff


async def test_migrate_twice_is_a_noop_and_matches_models(db: Database) -> None:
    await db.migrate()
    async with db.engine.connect() as conn:
        tables, version, diff = await conn.run_sync(_schema_facts)
    assert TABLES <= tables
    assert version == _head_revision()
    assert diff == [], "models and migrations disagree"


async def test_for_settings_creates_sqlite_dir_with_wal_and_foreign_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    db = Database.for_settings(Settings(data_dir=data_dir, database_url=None))
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            foreign_keys = (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one()
    finally:
        await db.dispose()
    assert (data_dir / "sandbox.db").is_file()
    assert (journal, foreign_keys) == ("wal", 1)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "sqlite+pysqlcipher:///x.db"])
def test_unsupported_url_is_a_config_error(url: str) -> None:
    with pytest.raises(SandboxConfigError):
        Database.from_url(url)


def test_plain_urls_get_the_async_driver() -> None:
    assert Database.from_url("sqlite:///:memory:").engine.url.drivername == "sqlite+aiosqlite"
    assert Database.from_url("postgresql://u@h/db").engine.url.drivername == "postgresql+psycopg"


# --------------------------------------------------------------------------- apply / get


async def test_apply_and_get_round_trip(repo: LeaseRepository) -> None:
    plus_two = timezone(timedelta(hours=2))
    record = LeaseRecord(
        lease_id="lease/ws1/g1",
        workspace_id="ws1",
        group_id="g1",
        backend="modal",
        os="linux",
        liveness="warm",
        epoch=3,
        instance_id="sb-123",
        envelope={"instance_id": "sb-123", "ports": {"vnc": 5901}, "tags": ["a", "b"], "ready": True},
        transition_seq=7,
        reason="probe ok",
        updated_at=datetime(2026, 3, 4, 7, 0, 0, 1, tzinfo=plus_two),
        holders=[holder("turn", "t1", 0, subject="user:1"), holder("viewer", "v1", 1)],
    )
    assert await repo.apply(record) is True

    got = await repo.get("ws1", "g1")
    assert got == record
    assert got == await repo.get_by_id("lease/ws1/g1")
    assert got.updated_at == datetime(2026, 3, 4, 5, 0, 0, 1, tzinfo=UTC)
    for stamp in [got.updated_at, *(h.acquired_at for h in got.holders), *(h.last_heartbeat_at for h in got.holders)]:
        assert stamp.utcoffset() == timedelta(0)
    assert await repo.get("ws1", "other") is None
    assert await repo.get_by_id("lease/nope") is None


async def test_null_envelope_and_no_holders_round_trip(repo: LeaseRepository) -> None:
    record = lease(1, liveness="cold")
    assert await repo.apply(record) is True
    assert await repo.get("ws1", "g1") == record


async def test_older_transition_never_overwrites_newer(repo: LeaseRepository) -> None:
    newer = lease(5, holders=[holder("turn", "a"), holder("viewer", "b", 1)], envelope={"v": 5})
    older = lease(3, liveness="draining", holders=[holder("process", "c")], envelope={"v": 3})
    assert await repo.apply(newer) is True
    assert await repo.apply(older) is False
    assert await repo.get("ws1", "g1") == newer


async def test_equal_seq_is_a_noop_and_newer_replaces_holders(repo: LeaseRepository) -> None:
    first = lease(5, holders=[holder("turn", "a")])
    assert await repo.apply(first) is True
    assert await repo.apply(lease(5, liveness="draining", holders=[holder("viewer", "z")])) is False
    assert await repo.get("ws1", "g1") == first

    released = lease(6, liveness="warm", holders=[holder("recording", "r", 2)])
    assert await repo.apply(released) is True
    assert await repo.get("ws1", "g1") == released
    emptied = lease(7, liveness="cold")
    assert await repo.apply(emptied) is True
    assert (await repo.get("ws1", "g1")).holders == []  # type: ignore[union-attr]


async def test_events_are_idempotent_and_newest_first(repo: LeaseRepository) -> None:
    assert await repo.apply(lease(2), [event(1), event(2)]) is True
    assert await repo.apply(lease(2), [event(1), event(2)]) is False
    # A stale lease write still records events it carries, and never rewrites stored ones.
    assert await repo.apply(lease(1), [event(1, reason="retry"), event(3)]) is False

    events = await repo.events("lease/ws1/g1")
    assert [e.transition_seq for e in events] == [3, 2, 1]
    assert events[-1] == event(1)
    assert [e.transition_seq for e in await repo.events("lease/ws1/g1", limit=2)] == [3, 2]
    assert await repo.events("lease/ws9/g9") == []
    with pytest.raises(InvalidRequest):
        await repo.events("lease/ws1/g1", limit=0)


async def test_event_of_another_lease_is_refused(repo: LeaseRepository) -> None:
    with pytest.raises(InvalidRequest):
        await repo.apply(lease(1), [event(1, lease_id="lease/ws2/g1")])
    assert await repo.get_by_id("lease/ws1/g1") is None


async def test_list_filters_and_order(repo: LeaseRepository) -> None:
    rows = [
        lease(1, ws="ws1", group="g2", liveness="warm", holders=[holder("turn", "t")]),
        lease(1, ws="ws1", group="g1", liveness="cold"),
        lease(1, ws="ws2", group="g1", liveness="warm"),
        lease(1, ws="ws0", group="g9", liveness="draining"),
    ]
    for record in rows:
        assert await repo.apply(record)

    def keys(records: list[LeaseRecord]) -> list[str]:
        return [r.lease_id for r in records]

    everything = await repo.list()
    assert keys(everything) == ["lease/ws0/g9", "lease/ws1/g1", "lease/ws1/g2", "lease/ws2/g1"]
    assert everything[2] == rows[0]  # holders included
    assert keys(await repo.list(liveness="warm")) == ["lease/ws1/g2", "lease/ws2/g1"]
    assert keys(await repo.list(workspace_id="ws1")) == ["lease/ws1/g1", "lease/ws1/g2"]
    assert keys(await repo.list(liveness="warm", workspace_id="ws1")) == ["lease/ws1/g2"]
    assert keys(await repo.list(limit=2)) == ["lease/ws0/g9", "lease/ws1/g1"]
    assert await repo.list(liveness="warming") == []
    with pytest.raises(InvalidRequest):
        await repo.list(limit=0)


# --------------------------------------------------------------------------- constraints


async def test_check_constraints_reject_bad_liveness_and_kind(repo: LeaseRepository) -> None:
    with pytest.raises(IntegrityError):
        await repo.apply(lease(1, liveness="hot"))
    assert await repo.get("ws1", "g1") is None

    good = lease(1, holders=[holder("turn", "a")])
    assert await repo.apply(good) is True
    # The bad holder aborts the whole transaction: the lease row keeps its previous transition.
    with pytest.raises(IntegrityError):
        await repo.apply(lease(2, holders=[holder("owner", "x")]), [event(2)])
    assert await repo.get("ws1", "g1") == good
    assert await repo.events("lease/ws1/g1") == []


async def test_group_is_bound_to_one_lease_id(repo: LeaseRepository) -> None:
    assert await repo.apply(lease(1))
    with pytest.raises(IntegrityError):
        await repo.apply(lease(2).model_copy(update={"lease_id": "lease/other"}))


async def test_deleting_a_lease_cascades_to_its_holders(db: Database, repo: LeaseRepository) -> None:
    await repo.apply(lease(1, holders=[holder("turn", "a"), holder("viewer", "b")]))
    async with db.sessionmaker.begin() as session:
        await session.execute(delete(LeaseRow).where(LeaseRow.id == "lease/ws1/g1"))
    async with db.sessionmaker() as session:
        remaining = (await session.execute(select(func.count()).select_from(LeaseHolderRow))).scalar_one()
    assert remaining == 0


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_applies_keep_the_highest_seq(repo: LeaseRepository) -> None:
    seqs = list(range(1, 21))
    random.Random(20).shuffle(seqs)
    livenesses = ["cold", "warming", "warm", "draining"]

    def record(seq: int) -> LeaseRecord:
        return lease(
            seq,
            liveness=livenesses[seq % 4],
            holders=[holder("turn", f"t{seq}"), holder("viewer", "shared", 1)],
            envelope={"seq": seq},
        )

    results = await asyncio.gather(*(repo.apply(record(seq), [event(seq)]) for seq in seqs))

    assert results[seqs.index(20)] is True
    assert await repo.get("ws1", "g1") == record(20)
    assert [e.transition_seq for e in await repo.events("lease/ws1/g1")] == list(range(20, 0, -1))


async def test_concurrent_first_migrations_do_not_collide(db_url: str) -> None:
    url = make_url(db_url)
    fresh = url.set(database=f"{url.database}.fresh" if url.get_backend_name() == "sqlite" else f"{url.database}_m")
    admin = None
    if url.get_backend_name() == "postgresql":
        admin = _libpq(db_url)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{fresh.database}"')
    dbs = [Database.from_url(fresh) for _ in range(3)]
    try:
        await asyncio.gather(*(d.migrate() for d in dbs))
        async with dbs[0].engine.connect() as conn:
            tables, version, _ = await conn.run_sync(_schema_facts)
        assert TABLES <= tables and version == _head_revision()
    finally:
        for d in dbs:
            await d.dispose()
        if admin is not None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{fresh.database}" WITH (FORCE)')


def _head_revision() -> str:
    """The newest migration: migrate() must always end there."""
    from alembic.script import ScriptDirectory

    from store.database import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head
