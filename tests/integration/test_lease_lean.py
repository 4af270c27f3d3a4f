"""A lean attach/release (issue 16 part 2): what one costs in history, and what the store sees meanwhile.

On a lease kept warm by another holder an attach and its release are two updates and nothing
else: the deadline timer is kept, search attributes are not upserted again, and the holder-only
change is written to the store at the lease's next wake (within one holder TTL), skipped when the
store already shows it. Transitions are still written at once, and the store never goes backwards.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from temporalio.api.enums.v1 import EventType

from store.leases import LeaseRepository
from tests.conftest import eventually, ids
from tests.integration.test_lease_workflow import record_history
from workflows.models.lease import lease_workflow_id


async def event_types(runtime: Any, ws: str, g: str) -> Counter[str]:
    handle = runtime.client.get_workflow_handle(lease_workflow_id(ws, g))
    return Counter([EventType.Name(e.event_type) async for e in handle.fetch_history_events()])


async def settled(runtime: Any, ws: str, g: str) -> Counter[str]:
    """The lease's event counts once its history stopped growing for a moment (projection written)."""
    last: Counter[str] | None = None
    while True:
        now = await event_types(runtime, ws, g)
        if now == last:
            return now
        last = now
        await asyncio.sleep(0.3)


async def test_a_warm_attach_and_release_cost_two_updates_and_nothing_else(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=30)
    ws, g = ids()
    await leases.acquire(ws, g, holder_id="keeper")
    before = await settled(runtime, ws, g)
    rounds = 5
    for i in range(rounds):
        grant = await leases.acquire(ws, g, holder_id=f"t{i}")
        assert grant.role == "attached"
        await leases.release(ws, g, f"t{i}")
    after = await settled(runtime, ws, g)
    added = after - before
    per_round = sum(added.values()) / rounds
    assert per_round <= 10, sorted(added.items())
    for kind in (
        "EVENT_TYPE_TIMER_STARTED",
        "EVENT_TYPE_TIMER_CANCELED",
        "EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
        "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED",
    ):
        assert added[kind] == 0, (kind, dict(added))
    assert added["EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED"] == 2 * rounds
    await leases.drain(ws, g, wait=True)
    await record_history(runtime, ws, g, "lean_attach_release")


async def test_the_store_catches_up_within_a_ttl_and_never_goes_backwards(runtime: Any) -> None:
    ttl = 1.0
    leases = runtime.leases(holder_ttl_seconds=ttl, idle_grace_seconds=30)
    ws, g = ids()
    repo = LeaseRepository(runtime.db)
    seen: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            record = await repo.get(ws, g)
            if record is not None:
                seen.append((record.transition_seq, record.liveness))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        grant = await leases.acquire(ws, g, holder_id="keeper")

        keeping = asyncio.Event()

        async def keep() -> None:
            while not keeping.is_set():
                await leases.heartbeat(ws, g, "keeper", grant.epoch)
                await leases.heartbeat(ws, g, "v1", grant.epoch, kind="viewer")
                await asyncio.sleep(ttl / 4)

        await leases.acquire(ws, g, kind="viewer", holder_id="v1")
        attached = time.monotonic()
        keeper = asyncio.create_task(keep())

        async def projected_viewer() -> bool:
            record = await repo.get(ws, g)
            return record is not None and ("viewer", "v1") in {(h.kind, h.holder_id) for h in record.holders}

        await eventually(projected_viewer, timeout=5 * ttl, interval=0.02)
        assert time.monotonic() - attached <= ttl + 1.0, "a holder-only change waited past the next deadline"
        keeping.set()
        await keeper
        await leases.release(ws, g, "v1", kind="viewer")
        drained = await leases.drain(ws, g, wait=True)  # transitions: written at once
    finally:
        stop.set()
        await watcher

    async def projected_cold() -> Any:
        record = await repo.get(ws, g)
        return record if record is not None and record.liveness == "cold" else None

    record = await eventually(projected_cold, timeout=5)
    assert record.epoch == drained.epoch
    seqs = [seq for seq, _ in seen]
    assert seqs == sorted(seqs), "the projection went backwards"
    assert {"warm", "cold"} <= {liveness for _, liveness in seen}
