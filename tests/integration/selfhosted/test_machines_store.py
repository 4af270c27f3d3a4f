"""Enrollments and session pointers on real databases: SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from sandbox.errors import InvalidRequest, StaleEpoch
from sandbox.liveness import selfhosted_liveness
from sandbox.routing import ActivePointer
from store.database import Database
from store.machines import EnrollmentRepository, SessionPointerRepository
from store.models import Base
from tests.conftest import fresh_postgres_database

T0 = datetime(2026, 5, 10, 12, 0, 0, tzinfo=UTC)
OUR_TABLES = {"enrollments", "session_pointers"}


@pytest.fixture(scope="module")
def pg_url(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped afterwards."""
    with fresh_postgres_database(postgres_url, "machines_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    database = Database.from_url(url)
    await database.migrate()
    if database.dialect == "postgresql":
        async with database.engine.begin() as conn:
            await conn.execute(text("TRUNCATE enrollments, session_pointers"))
    try:
        yield database
    finally:
        await database.dispose()


def _facts(conn: Connection) -> tuple[set[str], list[object]]:
    diff = [d for d in compare_metadata(MigrationContext.configure(conn), Base.metadata) if _ours(d)]
    return set(inspect(conn).get_table_names()), diff


def _ours(diff: object) -> bool:
    return any(name in repr(diff) for name in OUR_TABLES)


async def test_migration_creates_our_tables_matching_the_models(db: Database) -> None:
    async with db.engine.connect() as conn:
        tables, diff = await conn.run_sync(_facts)
    assert OUR_TABLES <= tables
    assert diff == [], "models and migration 0002 disagree"


async def test_enroll_list_revoke_and_liveness(db: Database) -> None:
    repo = EnrollmentRepository(db)
    rec = await repo.enroll("ws1", "laptop", exposure="whole-machine", allow_screen_control=True, now=T0)
    assert (rec.status, rec.exposure, rec.allow_screen_control, rec.last_seen_at) == (
        "active",
        "whole-machine",
        True,
        None,
    )
    await repo.enroll("ws1", "desk", now=T0)
    await repo.enroll("ws2", "other", now=T0)
    assert [r.agent_id for r in await repo.list("ws1")] == ["desk", "laptop"]

    assert await repo.record_seen("ws1", "laptop", now=T0, hostname="lap", os="linux", has_display=True)
    seen = await repo.get("ws1", "laptop")
    assert seen is not None and seen.hostname == "lap" and seen.has_display and seen.last_seen_at == T0
    live = selfhosted_liveness(seen.view(), False, T0 + timedelta(seconds=10))
    assert (live.state, live.consented, live.has_display) == ("reconnecting", True, True)
    assert selfhosted_liveness(seen.view(), False, T0 + timedelta(seconds=31)).state == "offline"

    assert await repo.record_offline("ws1", "laptop", "shutdown", now=T0)
    gone = await repo.get("ws1", "laptop")
    assert gone is not None and selfhosted_liveness(gone.view(), True, T0).state == "offline"
    await repo.record_seen("ws1", "laptop", now=T0 + timedelta(seconds=1))
    back = await repo.get("ws1", "laptop")
    assert back is not None and back.went_offline_at is None

    assert await repo.revoke("ws1", "laptop", now=T0)
    revoked = await repo.get("ws1", "laptop")
    assert revoked is not None and revoked.status == "revoked" and revoked.revoked_at == T0
    assert selfhosted_liveness(revoked.view(), True, T0).state == "offline"
    assert [r.agent_id for r in await repo.list("ws1", include_revoked=False)] == ["desk"]
    assert not await repo.revoke("ws1", "never-enrolled")
    again = await repo.enroll("ws1", "laptop", now=T0 + timedelta(hours=1))
    assert again.status == "active" and again.revoked_at is None and again.created_at == T0


async def test_enroll_refuses_bad_input(db: Database) -> None:
    repo = EnrollmentRepository(db)
    with pytest.raises(InvalidRequest):
        await repo.enroll("ws1", "bad.id")
    with pytest.raises(InvalidRequest):
        await repo.enroll("ws1", "ok", exposure="everything")  # type: ignore[arg-type]


async def test_pointer_defaults_home_and_swaps_by_compare_and_set(db: Database) -> None:
    repo = SessionPointerRepository(db)
    assert await repo.get("s1") == ActivePointer(active_sandbox_id=None, active_epoch=0)
    first = await repo.swap("s1", "selfhosted:laptop", expected_epoch=0, working_dir="proj", now=T0)
    assert first == ActivePointer(active_sandbox_id="selfhosted:laptop", active_epoch=1, working_dir="proj")
    assert await repo.get("s1") == first
    with pytest.raises(StaleEpoch):
        await repo.swap("s1", "lease:g2", expected_epoch=0)
    home = await repo.swap("s1", None, expected_epoch=1)
    assert home.active_sandbox_id is None and home.active_epoch == 2
    with pytest.raises(InvalidRequest):
        await repo.swap("s1", None, expected_epoch=-1)


async def test_racing_swaps_have_exactly_one_winner(db: Database) -> None:
    repo = SessionPointerRepository(db)
    await repo.swap("race", "selfhosted:a", expected_epoch=0)

    async def attempt(target: str) -> str | None:
        try:
            await repo.swap("race", target, expected_epoch=1)
        except StaleEpoch:
            return None
        return target

    results = await asyncio.gather(*(attempt(f"selfhosted:t{i}") for i in range(8)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await repo.get("race") == ActivePointer(active_sandbox_id=winners[0], active_epoch=2)


async def test_racing_first_swaps_of_a_new_session_have_one_winner(db: Database) -> None:
    repo = SessionPointerRepository(db)

    async def attempt(target: str) -> bool:
        try:
            await repo.swap("fresh", target, expected_epoch=0)
        except StaleEpoch:
            return False
        return True

    assert sum(await asyncio.gather(*(attempt(f"selfhosted:t{i}") for i in range(6)))) == 1
    assert (await repo.get("fresh")).active_epoch == 1
