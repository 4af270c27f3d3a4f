"""SnapshotGcWorkflow on a real worker and Temporal dev server, with SQLite and PostgreSQL stores.

Set ``SANDBOX_RECORD_HISTORIES=1`` to (re)write the replay fixture ``snapshot_gc.json``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.worker import Worker

from activities.snapshots import SnapshotActivities
from providers.registry import ProviderRegistry
from sandbox.errors import ArtifactStoreUnavailable
from sandbox.settings import Settings
from store.artifacts import ArtifactStore, FilesystemArtifactStore, artifact_root, artifact_store, snapshot_key
from store.database import Database
from store.snapshots import SnapshotLedger, SnapshotRecord, new_snapshot_id
from workflows.models.maintenance import GcSettings, SnapshotGcInput, SnapshotGcResult
from workflows.snapshot_gc import SnapshotGcWorkflow

HISTORIES = Path(__file__).resolve().parents[2] / "replay" / "histories"


async def stream(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def publish_archives(
    ledger: SnapshotLedger, artifacts: ArtifactStore, ws: str, group: str, count: int
) -> list[SnapshotRecord]:
    """``count`` stored and published archives of one lease, oldest first."""
    records = []
    for i in range(count):
        snapshot_id = new_snapshot_id()
        key = snapshot_key(ws, group, snapshot_id, compressed=False)
        record = await ledger.record_candidate(
            snapshot_id=snapshot_id,
            lease_id=f"lease/{ws}/{group}",
            workspace_id=ws,
            group_id=group,
            epoch=i + 1,
            key=key,
            kind="tar",
            backend="local",
        )
        stored = await artifacts.put(key, stream([f"archive {i}".encode()]))
        await ledger.complete_candidate(record.snapshot_id, sha256=stored.sha256, size_bytes=stored.size_bytes)
        await ledger.publish(f"lease/{ws}/{group}", record.snapshot_id)
        records.append(record)
    return records


async def run_gc(client: Any, task_queue: str, settings: GcSettings | None = None) -> tuple[SnapshotGcResult, Any]:
    handle = await client.start_workflow(
        SnapshotGcWorkflow.run,
        SnapshotGcInput(settings=settings or GcSettings()),
        id=f"snapshot-gc-test-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue,
    )
    return await handle.result(), handle


@pytest.fixture(params=["runtime", pytest.param("pg_runtime", marks=pytest.mark.postgres), "s3_runtime"])
def any_runtime(request: pytest.FixtureRequest) -> Any:
    """The lease runtime with its SQLite store, with its PostgreSQL store, then with its archives on S3."""
    return request.getfixturevalue(request.param)


async def test_five_drains_leave_exactly_two_archives(any_runtime: Any) -> None:
    rt = any_runtime
    ledger = SnapshotLedger(rt.db)
    artifacts = artifact_store(rt.settings)
    ws, group = f"gc-{secrets.token_hex(4)}", "g1"
    records = await publish_archives(ledger, artifacts, ws, group, 5)

    result, handle = await run_gc(rt.client, rt.settings.task_queue)
    assert result.deleted >= 3 and result.failed == 0

    rows = {r.snapshot_id: r.state for r in await ledger.list(ws, group)}
    alive = {sid: state for sid, state in rows.items() if state != "deleted"}
    assert alive == {records[4].snapshot_id: "current", records[3].snapshot_id: "previous"}
    for record in records[:3]:
        assert not await artifacts.exists(record.key)
    for record in records[3:]:
        assert await artifacts.exists(record.key)

    again, _ = await run_gc(rt.client, rt.settings.task_queue)
    assert {r.snapshot_id: r.state for r in await ledger.list(ws, group)} == rows, "a second pass changes nothing"
    assert again.failed == 0
    if (
        rt.db.dialect == "sqlite"
        and rt.settings.artifacts_url is None
        and os.environ.get("SANDBOX_RECORD_HISTORIES") == "1"
    ):
        HISTORIES.mkdir(parents=True, exist_ok=True)
        (HISTORIES / "snapshot_gc.json").write_text((await handle.fetch_history()).to_json())


class FlakyDeletes(FilesystemArtifactStore):
    """A filesystem store whose first ``failures`` deletes fail like an unreachable disk."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.calls = 0

    async def delete(self, key: str) -> bool:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ArtifactStoreUnavailable(f"injected failure deleting {key}")
        return await super().delete(key)


async def test_a_delete_that_fails_twice_succeeds_later(temporal_client: Any, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", task_queue=f"gc-flaky-{uuid.uuid4()}")
    db = Database.for_settings(settings)
    await db.migrate()
    ledger = SnapshotLedger(db)
    artifacts = FlakyDeletes(artifact_root(settings), failures=2)
    providers = ProviderRegistry(settings)
    activities = SnapshotActivities(providers, ledger, artifacts)
    worker = Worker(
        temporal_client,
        task_queue=settings.task_queue,
        workflows=[SnapshotGcWorkflow],
        activities=[activities.claim_gc, activities.delete_objects, activities.settle_gc],
        graceful_shutdown_timeout=timedelta(seconds=1),
    )
    gc = GcSettings(backoff_base_seconds=0.2, backoff_max_seconds=1.0)
    try:
        async with worker:
            old, _, _ = await publish_archives(ledger, artifacts, "ws", "g", 3)
            seen: list[tuple[str, int]] = []
            for _ in range(60):
                result, _ = await run_gc(temporal_client, settings.task_queue, gc)
                row = await ledger.get(old.snapshot_id)
                assert row is not None
                if result.claimed:
                    seen.append((row.state, row.delete_attempts))
                if row.state == "deleted":
                    break
                await asyncio.sleep(0.1)
            assert seen == [("delete_failed", 1), ("delete_failed", 2), ("deleted", 2)]
            row = await ledger.get(old.snapshot_id)
            assert row is not None and row.last_delete_error is not None and "injected failure" in row.last_delete_error
            assert artifacts.calls == 3
            assert not await artifacts.exists(old.key)
            assert {r.state for r in await ledger.list("ws", "g")} == {"deleted", "current", "previous"}
    finally:
        await providers.aclose()
        await db.dispose()
