"""The recordings table on real databases: SQLite (a file) and PostgreSQL (the shared test server)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from sandbox.errors import InvalidRequest
from store.database import Database
from store.models import Base, RecordingRow
from store.recordings import RecordingStore
from store.records import RecordingRecord
from tests.conftest import fresh_postgres_database, migrated_store

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pg_recordings_url(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped afterwards."""
    with fresh_postgres_database(postgres_url, "recordings_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_recordings_url")
    async with migrated_store(url, empty=("recordings",)) as database:
        yield database


def record(rid: str = "rec-1", *, version: int = 1, minutes: float = 0, **fields: object) -> RecordingRecord:
    values: dict[str, object] = {
        "recording_id": rid,
        "workspace_id": "ws1",
        "session_id": "s1",
        "group_id": "g1",
        "lease_id": "lease/ws1/g1",
        "state": "starting",
        "codec": "h264-mp4",
        "framerate": 15,
        "max_seconds": 600,
        "max_bytes": 268_435_456,
        "content_type": "video/mp4",
        "version": version,
        "created_at": T0 + timedelta(minutes=minutes),
        "updated_at": T0 + timedelta(minutes=minutes, seconds=version),
    }
    values.update(fields)
    return RecordingRecord.model_validate(values)


def _diff(conn: Connection) -> list[object]:
    diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    return [d for d in diff if RecordingRow.__tablename__ in repr(d)]


async def test_migration_matches_the_model(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_newer_versions_apply_and_older_ones_never_do(db: Database) -> None:
    store = RecordingStore(db)
    assert await store.apply(record(version=1))
    available = record(
        version=3,
        state="available",
        storage_key="recordings/ws1/s1/rec-1.mp4",
        size_bytes=1234,
        sha256="a" * 64,
        duration_seconds=3.02,
        width=1280,
        height=800,
        started_at=T0,
        finalized_at=T0 + timedelta(seconds=5),
    )
    assert await store.apply(available)
    assert not await store.apply(record(version=2, state="recording")), "a late write is ignored"
    assert not await store.apply(available), "repeating the commit is a no-op"
    got = await store.get("rec-1")
    assert got == available
    assert await store.get("rec-missing") is None


async def test_list_is_newest_first_per_workspace_and_session(db: Database) -> None:
    store = RecordingStore(db)
    for i, (ws, session) in enumerate([("ws1", "s1"), ("ws1", "s2"), ("ws1", "s1"), ("ws2", "s1")]):
        await store.apply(record(f"rec-{i}", minutes=i, workspace_id=ws, session_id=session))
    assert [r.recording_id for r in await store.list("ws1")] == ["rec-2", "rec-1", "rec-0"]
    assert [r.recording_id for r in await store.list("ws1", session_id="s1")] == ["rec-2", "rec-0"]
    assert [r.recording_id for r in await store.list("ws1", limit=1)] == ["rec-2"]
    with pytest.raises(InvalidRequest):
        await store.list("ws1", limit=0)


@pytest.mark.parametrize("field", [{"state": "paused"}, {"codec": "gif"}])
async def test_the_schema_refuses_unknown_states_and_codecs(db: Database, field: dict[str, str]) -> None:
    store = RecordingStore(db)
    bad = record().model_construct(**{**record().model_dump(), **field})
    with pytest.raises(IntegrityError):
        await store.apply(bad)
