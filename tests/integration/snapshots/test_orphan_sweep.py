"""OrphanSweepWorkflow and its activities: live leases' boxes are never touched, orphans go after the grace.

Set ``SANDBOX_RECORD_HISTORIES=1`` to (re)write the replay fixture ``orphan_sweep.json``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.orphans import OrphanActivities
from providers.local import LocalProvider
from providers.registry import ProviderRegistry
from sandbox.box import BoxSpec
from sandbox.settings import Settings
from store.database import Database
from store.leases import LeaseRepository
from store.records import LeaseRecord
from tests.conftest import eventually
from workflows.models.maintenance import OrphanScanRequest, OrphanSweepInput, OrphanTerminateRequest
from workflows.orphan_sweep import OrphanSweepWorkflow

HISTORIES = Path(__file__).resolve().parents[2] / "replay" / "histories"


def spec(lease_id: str, epoch: int) -> BoxSpec:
    _, ws, group = lease_id.split("/")
    return BoxSpec(lease_id=lease_id, workspace_id=ws, group_id=group, epoch=epoch)


async def test_sweep_terminates_orphans_after_the_grace_and_never_a_live_box(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=60)
    ws, group = f"orph-{secrets.token_hex(4)}", "g1"
    lease_id = f"lease/{ws}/{group}"
    grant = await leases.acquire(ws, group, kind="turn", holder_id="t1", backend="local")
    repo = LeaseRepository(runtime.db)

    async def projected() -> bool:
        record = await repo.get_by_id(lease_id)
        return record is not None and record.instance_id == grant.instance_id

    await eventually(projected)
    boxes = LocalProvider(runtime.settings.boxes_dir(), bubblewrap="never")
    try:
        ghost = await boxes.create(spec(f"lease/{ws}-ghost/g1", 0), f"ghost-{uuid.uuid4()}")
        stale = await boxes.create(spec(lease_id, grant.epoch - 1), f"stale-{uuid.uuid4()}")
        await asyncio.sleep(0.6)
        young = await boxes.create(spec(f"lease/{ws}-young/g1", 0), f"young-{uuid.uuid4()}")

        handle = await runtime.client.start_workflow(
            OrphanSweepWorkflow.run,
            OrphanSweepInput(grace_seconds=0.5, recheck_delay_seconds=0.1),
            id=f"orphan-sweep-test-{uuid.uuid4().hex[:8]}",
            task_queue=runtime.settings.task_queue,
        )
        result = await handle.result()

        assert {ghost.instance_id, stale.instance_id} <= set(result.terminated)
        assert grant.instance_id not in result.terminated
        assert young.instance_id not in result.terminated
        assert result.young >= 1 and result.live >= 1
        reasons = {c.instance_id: c.reason for c in result.candidates}
        assert "not in the projection" in reasons[ghost.instance_id]
        assert "moved on" in reasons[stale.instance_id]
        root = runtime.settings.boxes_dir()
        assert not (root / ghost.instance_id).exists() and not (root / stale.instance_id).exists()
        assert (root / young.instance_id).is_dir()
        # The live lease's box is untouched and still works.
        out = await leases.exec(ws, group, ["sh", "-c", "echo alive"])
        assert out.stdout == "alive\n" and out.epoch == grant.epoch
        if os.environ.get("SANDBOX_RECORD_HISTORIES") == "1":
            HISTORIES.mkdir(parents=True, exist_ok=True)
            (HISTORIES / "orphan_sweep.json").write_text((await handle.fetch_history()).to_json())
        await boxes.terminate(young.serialize_state())
    finally:
        await boxes.aclose()
        await leases.drain(ws, group, wait=True)


@pytest.fixture
async def sweeper(tmp_path: Path) -> AsyncIterator[tuple[OrphanActivities, LeaseRepository, LocalProvider]]:
    settings = Settings(data_dir=tmp_path / "data", local_use_bubblewrap="never")
    db = Database.for_settings(settings)
    await db.migrate()
    providers = ProviderRegistry(settings)
    repo = LeaseRepository(db)
    local = providers.get("local")
    assert isinstance(local, LocalProvider)
    try:
        yield OrphanActivities(providers, repo), repo, local
    finally:
        await providers.aclose()
        await db.dispose()


def projection(lease_id: str, *, liveness: str, epoch: int, instance_id: str | None, seq: int) -> LeaseRecord:
    _, ws, group = lease_id.split("/")
    return LeaseRecord(
        lease_id=lease_id,
        workspace_id=ws,
        group_id=group,
        backend="local",
        liveness=liveness,
        epoch=epoch,
        instance_id=instance_id,
        transition_seq=seq,
        reason="test",
        updated_at=datetime.now(UTC),
    )


async def test_the_recheck_spares_a_box_a_lease_took_meanwhile(
    sweeper: tuple[OrphanActivities, LeaseRepository, LocalProvider],
) -> None:
    activities, repo, local = sweeper
    box = await local.create(spec("lease/ws/g", 3), "key-1")
    await repo.apply(projection("lease/ws/g", liveness="cold", epoch=4, instance_id=None, seq=1))
    scan = await ActivityEnvironment().run(activities.scan, OrphanScanRequest(grace_seconds=0))
    (orphan,) = scan.orphans
    assert orphan.instance_id == box.instance_id and "cold" in orphan.reason

    # Between scan and terminate the projection changes so that a live lease names the box.
    await repo.apply(projection("lease/ws/g", liveness="warm", epoch=4, instance_id=box.instance_id, seq=2))
    req = OrphanTerminateRequest(box=orphan, grace_seconds=0)
    outcome = await ActivityEnvironment().run(activities.terminate, req)
    assert not outcome.terminated and "held by lease/ws/g" in outcome.reason
    assert box.path.is_dir()

    await repo.apply(projection("lease/ws/g", liveness="cold", epoch=5, instance_id=None, seq=3))
    outcome = await ActivityEnvironment().run(activities.terminate, req)
    assert outcome.terminated
    assert not box.path.exists()
    again = await ActivityEnvironment().run(activities.terminate, req)
    assert (again.terminated, again.reason) == (False, "already gone")


async def test_a_box_being_provisioned_is_not_an_orphan(
    sweeper: tuple[OrphanActivities, LeaseRepository, LocalProvider],
) -> None:
    activities, repo, local = sweeper
    # The lease is warming at epoch 7 and its box (epoch 7) is not in the projection yet.
    warming = await local.create(spec("lease/ws/w", 7), "warming-key")
    await repo.apply(projection("lease/ws/w", liveness="warming", epoch=7, instance_id=None, seq=1))
    result = await activities.find_orphans(["local"], grace_seconds=0)
    assert result.orphans == [] and result.live == 1
    assert warming.path.is_dir()


async def test_selfhosted_and_none_are_never_swept(
    sweeper: tuple[OrphanActivities, LeaseRepository, LocalProvider],
) -> None:
    activities, _, _ = sweeper
    result = await activities.find_orphans(["selfhosted", "none"], grace_seconds=0)
    assert result.skipped_backends == ["selfhosted", "none"] and result.scanned == 0
