"""The ``recordings`` table: one row per desktop recording, written by its recording workflow.

The workflow is the single writer of a recording; its projection activity may be retried or
overtaken, so :meth:`RecordingStore.apply` keeps a write only when its ``version`` is higher than the
stored one, checked by the database inside the upsert. The final ``available`` write is the commit
the workflow waits for before it deletes the video from the box.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite

from sandbox.errors import InvalidRequest
from store.database import Database
from store.models import RecordingRow
from store.records import RecordingRecord

__all__ = ["RecordingStore"]

_T: Table = RecordingRow.__table__  # type: ignore[assignment]

# Everything a newer write replaces (the id and the creation time stay).
_UPDATED = (
    "workspace_id",
    "session_id",
    "group_id",
    "lease_id",
    "state",
    "reason",
    "detail",
    "codec",
    "framerate",
    "max_seconds",
    "max_bytes",
    "epoch",
    "instance_id",
    "width",
    "height",
    "storage_key",
    "content_type",
    "size_bytes",
    "sha256",
    "duration_seconds",
    "version",
    "started_at",
    "finalized_at",
    "updated_at",
)

MAX_LIST_LIMIT = 1000


def _record(row: Any) -> RecordingRecord:
    return RecordingRecord(
        recording_id=row.id,
        workspace_id=row.workspace_id,
        session_id=row.session_id,
        group_id=row.group_id,
        lease_id=row.lease_id,
        state=row.state,
        reason=row.reason,
        detail=row.detail,
        codec=row.codec,
        framerate=row.framerate,
        max_seconds=row.max_seconds,
        max_bytes=row.max_bytes,
        epoch=row.epoch,
        instance_id=row.instance_id,
        width=row.width,
        height=row.height,
        storage_key=row.storage_key,
        content_type=row.content_type,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        duration_seconds=row.duration_seconds,
        version=row.version,
        created_at=row.created_at,
        started_at=row.started_at,
        finalized_at=row.finalized_at,
        updated_at=row.updated_at,
    )


class RecordingStore:
    """Reads and writes ``recordings``.

    Args:
        db: The store's database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    async def apply(self, record: RecordingRecord) -> bool:
        """Insert the row, or update it if ``record.version`` is newer than the stored one.

        Returns whether the write applied (False: the stored row is as new or newer, so a
        repeated write is a no-op). Raises ``sqlalchemy.exc.IntegrityError`` for values the schema
        refuses (unknown state, reason or codec).
        """
        values = {
            "id": record.recording_id,
            **{name: getattr(record, name) for name in _UPDATED},
            "created_at": record.created_at,
        }
        insert = (postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert)(_T).values(values)
        upsert = insert.on_conflict_do_update(
            index_elements=[_T.c.id],
            set_={name: insert.excluded[name] for name in _UPDATED},
            where=_T.c.version < insert.excluded.version,
        ).returning(_T.c.id)
        async with self._db.sessionmaker.begin() as session:
            return (await session.execute(upsert)).scalar_one_or_none() is not None

    async def get(self, recording_id: str) -> RecordingRecord | None:
        """The recording's row, or None."""
        async with self._db.sessionmaker() as session:
            row = (await session.execute(select(_T).where(_T.c.id == recording_id))).one_or_none()
        return None if row is None else _record(row)

    async def list(
        self, workspace_id: str, *, session_id: str | None = None, limit: int = 100
    ) -> list[RecordingRecord]:
        """A workspace's recordings (optionally one session's), newest first.

        Raises:
            InvalidRequest: ``limit`` is not 1..1000.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_LIST_LIMIT}, not {limit}")
        query = select(_T).where(_T.c.workspace_id == workspace_id)
        if session_id is not None:
            query = query.where(_T.c.session_id == session_id)
        query = query.order_by(_T.c.created_at.desc(), _T.c.id).limit(limit)
        async with self._db.sessionmaker() as session:
            rows = (await session.execute(query)).all()
        return [_record(row) for row in rows]
