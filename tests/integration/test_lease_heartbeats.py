"""Holder heartbeats off the lease's history (issue 16 part 1), end to end on the dev server.

A heartbeat is a ``heartbeat_check`` query plus one row write in ``sandbox_holder_heartbeats``; the
lease reads those rows only at a holder's deadline. These tests count history events around
heartbeats, keep a holder alive past its TTL by store heartbeats alone, let one stop and time its
expiry against the bound of ``LeaseWorkflow._expire_holders``, and check that refusals keep the
update's typed errors and words.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from sandbox import errors
from sandbox.failures import call_workflow
from store.heartbeats import HolderHeartbeats
from store.leases import LeaseRepository
from tests.conftest import eventually, ids
from tests.integration.test_lease_workflow import HISTORIES, record_history
from workflows.lease import LeaseWorkflow
from workflows.models.lease import HeartbeatRequest, LeaseInput, lease_workflow_id


async def history_length(runtime: Any, ws: str, g: str) -> int:
    handle = runtime.client.get_workflow_handle(lease_workflow_id(ws, g))
    return len([e async for e in handle.fetch_history_events()])


async def test_heartbeats_write_no_history_and_land_in_the_store(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    await leases.heartbeat(ws, g, "t1", grant.epoch)  # the first one may still see projection work settle
    await eventually(lambda: _settled(runtime, ws, g))
    before = await history_length(runtime, ws, g)
    for _ in range(20):
        ok = await leases.heartbeat(ws, g, "t1", grant.epoch)
        assert ok.alive and ok.epoch == grant.epoch and ok.liveness == "warm"
    assert await history_length(runtime, ws, g) == before, "a heartbeat wrote history events"
    marks = await HolderHeartbeats(runtime.db).read(grant.lease_id)
    assert [(m.kind, m.holder_id, m.epoch, m.beats) for m in marks] == [("turn", "t1", grant.epoch, 21)]
    await leases.drain(ws, g, wait=True)


async def _settled(runtime: Any, ws: str, g: str) -> bool:
    # No activity in flight (the projection of the acquire has completed).
    first = await history_length(runtime, ws, g)
    await asyncio.sleep(0.3)
    return await history_length(runtime, ws, g) == first


async def test_store_heartbeats_keep_a_holder_past_its_ttl_and_a_silent_one_expires_within_the_bound(
    runtime: Any,
) -> None:
    ttl = 1.0
    leases = runtime.leases(holder_ttl_seconds=ttl, idle_grace_seconds=30)
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    until = time.monotonic() + 4 * ttl
    while time.monotonic() < until:  # four TTLs on heartbeats alone
        await leases.heartbeat(ws, g, "t1", grant.epoch)
        await asyncio.sleep(ttl / 4)
    view = await leases.describe(ws, g)
    assert [(h.kind, h.holder_id) for h in view.holders] == [("turn", "t1")]
    assert view.liveness == "warm"

    await leases.heartbeat(ws, g, "t1", grant.epoch)
    last = time.monotonic()

    async def gone() -> bool:
        return not (await leases.describe(ws, g)).holders

    await eventually(gone, timeout=10 * ttl, interval=0.02)
    silent_for = time.monotonic() - last
    # Not before its TTL; by the bound (2 x TTL, plus the reads and this poll's slack).
    assert ttl * 0.9 <= silent_for <= 2 * ttl + 1.0, silent_for
    assert (await leases.describe(ws, g)).liveness == "draining"
    with pytest.raises(errors.HolderNotFound):
        await leases.heartbeat(ws, g, "t1", grant.epoch)
    await leases.drain(ws, g, wait=True)
    await record_history(runtime, ws, g, "heartbeats_off_history")


async def test_refusals_keep_the_updates_types_and_words(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    handle = runtime.client.get_workflow_handle_for(LeaseWorkflow.run, lease_workflow_id(ws, g))
    for holder, epoch, expected in (
        ("t1", grant.epoch + 1, errors.StaleEpoch),
        ("ghost", grant.epoch, errors.HolderNotFound),
    ):
        with pytest.raises(expected) as by_client:
            await leases.heartbeat(ws, g, holder, epoch)
        check = await handle.query(LeaseWorkflow.heartbeat_check, HeartbeatRequest(holder_id=holder, epoch=epoch))
        assert (check.refusal, check.message) == (expected.error_type, by_client.value.message)
        req = HeartbeatRequest(holder_id=holder, epoch=epoch)
        with pytest.raises(expected) as by_update:  # the update path, refused by its validator
            await call_workflow(lambda r=req: handle.execute_update(LeaseWorkflow.heartbeat, r))
        assert by_update.value.message == by_client.value.message
        assert by_update.value.retryable == by_client.value.retryable
    await leases.drain(ws, g, wait=True)
    with pytest.raises(errors.StaleEpoch):
        await leases.heartbeat(ws, g, "t1", grant.epoch)


async def test_a_client_on_another_store_heartbeats_by_update(runtime: Any, tmp_path: Any) -> None:
    # Its heartbeats would land where the worker never reads: it must not write them there.
    leases = runtime.leases()
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    other = runtime.settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{tmp_path}/other.db"})
    from client import LeaseClient

    elsewhere = LeaseClient(runtime.client, other)
    await eventually(lambda: _settled(runtime, ws, g))
    before = await history_length(runtime, ws, g)
    ok = await elsewhere.heartbeat(ws, g, "t1", grant.epoch)
    assert ok.alive
    assert await history_length(runtime, ws, g) > before, "the fallback is the heartbeat update"
    assert not (tmp_path / "other.db").exists()
    assert await HolderHeartbeats(runtime.db).read(grant.lease_id) == []
    await leases.drain(ws, g, wait=True)


async def _beat_for(leases: Any, ws: str, g: str, epoch: int, seconds: float, every: float = 0.25) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        await leases.heartbeat(ws, g, "t1", epoch)
        await asyncio.sleep(every)


async def test_continue_as_new_carries_the_heartbeat_bookkeeping(runtime: Any) -> None:
    ttl = 1.0
    leases = runtime.leases(holder_ttl_seconds=ttl, idle_grace_seconds=30, continue_as_new_after_updates=8)
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    handle = runtime.client.get_workflow_handle(lease_workflow_id(ws, g))
    first_run = (await handle.describe()).run_id
    await _beat_for(leases, ws, g, grant.epoch, 2.5 * ttl)  # past two deadlines: the lease counted the beats
    for i in range(4):  # updates drive continue-as-new
        await leases.heartbeat(ws, g, "t1", grant.epoch)
        await leases.acquire(ws, g, kind="direct", holder_id=f"d{i}")
        await leases.release(ws, g, f"d{i}", kind="direct")

    async def new_run() -> bool:
        return (await handle.describe()).run_id != first_run

    await eventually(new_run)
    started = [e async for e in handle.fetch_history_events()][0]
    [carried] = await runtime.client.data_converter.decode(
        started.workflow_execution_started_event_attributes.input.payloads, [LeaseInput]
    )
    assert carried.state.store_id == runtime.db.store_id
    [t1] = [h for h in carried.state.holders if h.holder_id == "t1"]
    assert t1.beats >= 1, "the beat count seen at the last deadline was not carried"
    # The new run keeps t1 on store heartbeats alone, at the same epoch and box.
    await _beat_for(leases, ws, g, grant.epoch, 3 * ttl)
    view = await leases.describe(ws, g)
    assert [(h.kind, h.holder_id) for h in view.holders] == [("turn", "t1")]
    assert (view.liveness, view.epoch, view.instance_id) == ("warm", grant.epoch, grant.instance_id)
    await leases.drain(ws, g, wait=True)
    if os.environ.get("SANDBOX_RECORD_HISTORIES") == "1" and not (HISTORIES / NAME_CAN).exists():
        first = runtime.client.get_workflow_handle(lease_workflow_id(ws, g), run_id=first_run)
        (HISTORIES / NAME_CAN).write_text((await first.fetch_history()).to_json())


NAME_CAN = "lease_continue_as_new_heartbeats.json"


async def test_a_holder_asks_the_lease_once_per_half_ttl_and_the_store_still_fences_a_stale_epoch(
    runtime: Any,
) -> None:
    leases = runtime.leases()  # holder TTL 30 s: one check stands for 15 s
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    asked: list[Any] = []
    handle_of = leases.handle

    def counting_handle(workspace_id: str, group_id: str) -> Any:
        handle = handle_of(workspace_id, group_id)
        query = handle.query

        async def counted(*args: Any, **kwargs: Any) -> Any:
            asked.append(args[0])
            return await query(*args, **kwargs)

        handle.query = counted  # type: ignore[method-assign]
        return handle

    leases.handle = counting_handle  # type: ignore[method-assign]
    for _ in range(10):
        await leases.heartbeat(ws, g, "t1", grant.epoch)
    assert len(asked) == 1, asked
    drained = await leases.drain(ws, g, wait=True)
    repo = LeaseRepository(runtime.db)

    async def projected_cold() -> bool:
        record = await repo.get(ws, g)
        return record is not None and record.epoch == drained.epoch

    await eventually(projected_cold)
    with pytest.raises(errors.StaleEpoch) as refused:
        await leases.heartbeat(ws, g, "t1", grant.epoch)
    assert len(asked) == 1, "the store refused it without asking the lease"
    check = await handle_of(ws, g).query(
        LeaseWorkflow.heartbeat_check, HeartbeatRequest(holder_id="t1", epoch=grant.epoch)
    )
    assert (check.refusal, check.message) == (errors.StaleEpoch.error_type, refused.value.message)
    with pytest.raises(errors.StaleEpoch):  # and the next one asks the lease again
        await leases.heartbeat(ws, g, "t1", grant.epoch)
    assert len(asked) == 2
