"""A worker killed (SIGKILL) after the video was uploaded and before its row committed.

The worker runs as a real subprocess (``python -m worker``). The test holds SQLite's write lock
while the recording finalizes, so the upload completes but the commit (the ``available`` row) blocks;
the worker is killed while the commit runs. After a restart the recording ends ``available`` exactly
once, with one stored object, and the box file is deleted only after the commit.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.testing import WorkflowEnvironment

from client import LeaseClient
from client.recording_client import RecordingClient
from sandbox.settings import Settings
from store.artifacts import FilesystemArtifactStore, artifact_root
from store.database import Database
from store.recordings import RecordingStore
from tests.conftest import eventually
from tests.integration.recording.conftest import ffprobe, wait_state
from tests.integration.test_worker_restart import WorkerProcess
from workflows.recording_models import PROJECT_RECORDING, UPLOAD_RECORDING, RecordingTimers

pytestmark = pytest.mark.timeout(120)


async def _commit_running(handle: Any) -> bool:
    """The upload completed and the commit activity is running (started, not finished)."""
    history = await handle.fetch_history()
    uploaded = any(
        e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
        and _activity_type(history, e.activity_task_completed_event_attributes.scheduled_event_id) == UPLOAD_RECORDING
        for e in history.events
    )
    if not uploaded:
        return False
    described = await handle.describe()
    return any(
        a.activity_type.name == PROJECT_RECORDING and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        for a in described.raw_description.pending_activities
    )


def _activity_type(history: Any, scheduled_event_id: int) -> str:
    for e in history.events:
        if e.event_id == scheduled_event_id:
            return str(e.activity_task_scheduled_event_attributes.activity_type.name)
    return ""


async def test_worker_killed_between_upload_and_commit_ends_available_once(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    target = temporal_env.client.service_client.config.target_host
    settings = Settings(
        data_dir=tmp_path / "data",
        temporal_address=target,
        task_queue=f"rec-restart-{uuid.uuid4()}",
        activity_heartbeat_seconds=1.5,
        idle_grace_seconds=0.2,
        snapshots_enabled=False,
    )
    env = {
        **os.environ,
        "SANDBOX_DATA_DIR": str(settings.data_dir),
        "SANDBOX_TEMPORAL_ADDRESS": target,
        "SANDBOX_TASK_QUEUE": settings.task_queue,
        "SANDBOX_SNAPSHOTS_ENABLED": "false",
        "SANDBOX_MAINTENANCE_SCHEDULES_ENABLED": "false",
    }
    first = WorkerProcess(env, tmp_path / "worker-a.log")
    first.wait_ready()
    second: WorkerProcess | None = None
    leases = LeaseClient(temporal_env.client, settings)
    recordings = RecordingClient(temporal_env.client, settings)
    db = Database.for_settings(settings)
    lock: sqlite3.Connection | None = None
    try:
        grant = await leases.acquire("ws-rec-restart", "g1", holder_id="t1")
        timers = RecordingTimers(poll_seconds=0.5, activity_heartbeat_seconds=2.0, acquire_timeout_seconds=60)
        started = await recordings.start("ws-rec-restart", "g1", recordings.request(), timers=timers)
        rid = started.recording_id
        await wait_state(recordings, rid, "recording")
        rows = RecordingStore(db)
        await eventually(lambda: _row_state(rows, rid, "recording"), timeout=30)
        await asyncio.sleep(1.5)

        # Hold SQLite's write lock: the upload can finish, the commit cannot.
        db_file = Path(settings.resolved_database_url().split("///", 1)[1])
        lock = sqlite3.connect(db_file, isolation_level=None, timeout=30)
        lock.execute("BEGIN IMMEDIATE")
        await recordings.stop(rid, wait=False)
        handle = recordings.handle(rid)
        await eventually(lambda: _commit_running(handle), timeout=30)

        store = FilesystemArtifactStore(artifact_root(settings))
        key = f"recordings/ws-rec-restart/g1/{rid}.mp4"
        box_file = settings.boxes_dir() / grant.instance_id / "data" / "tmp" / f"og-rec-{rid}.mp4"
        assert store.path_of(key).is_file(), "the upload completed before the commit"
        assert box_file.is_file(), "the box file is still there while the row is not committed"
        first.kill()
        row = await rows.get(rid)
        assert row is not None and row.state == "recording"
        lock.rollback()
        lock.close()
        lock = None

        second = WorkerProcess(env, tmp_path / "worker-b.log")
        second.wait_ready()
        view = await recordings.result(rid, timeout=60)
        assert view.state == "available", view
        assert [c.state for c in view.history].count("available") == 1

        row = await rows.get(rid)
        assert row is not None and row.state == "available" and row.storage_key == key
        objects = [p for p in (artifact_root(settings) / "recordings").rglob("*") if p.is_file()]
        assert objects == [store.path_of(key)], objects
        assert store.path_of(key).stat().st_size == row.size_bytes
        assert float(ffprobe(store.path_of(key))["format"]["duration"]) > 1.0
        assert not box_file.exists(), "deleted once the row committed"

        history = await handle.fetch_history()
        uploads = [
            e
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            and _activity_type(history, e.activity_task_completed_event_attributes.scheduled_event_id)
            == UPLOAD_RECORDING
        ]
        assert len(uploads) == 1, "the video was uploaded once"
        await leases.release("ws-rec-restart", "g1", "t1")
        await leases.drain("ws-rec-restart", "g1", wait=True)
    finally:
        if lock is not None:
            lock.close()
        await db.dispose()
        if first.proc.poll() is None:
            first.kill()
        if second is not None:
            assert second.terminate() == 0, second.log.read_text()[-2000:]


async def _row_state(rows: RecordingStore, rid: str, state: str) -> bool:
    row = await rows.get(rid)
    return row is not None and row.state == state
