"""The lease publishes ``stream.url.rotated`` when its epoch changes under viewers, and only then."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import Client

from providers.registry import ProviderRegistry
from sandbox.box import Envelope
from sandbox.nats_flush import flush_in_order
from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, Runtime, nats_server_at, running_runtime
from tests.integration.test_lease_workflow import record_history
from workflows.models.session_events import STREAM_URL_ROTATED, session_events_subject

pytestmark = pytest.mark.timeout(60)

WORKSPACE = "ws-rotated"


@pytest.fixture(scope="module")
async def events_runtime(
    temporal_client: Client, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Runtime]:
    """A worker whose session events go to the test's nats-server."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("rotated"), task_queue=f"test-rotated-{uuid.uuid4()}", nats_url=nats_url
    ).model_copy(update=FAST_TIMERS)
    async with running_runtime(temporal_client, settings) as rt:
        yield rt


@pytest.fixture
async def events(nats_url: str) -> AsyncIterator[tuple[Any, str, asyncio.Queue[dict[str, Any]]]]:
    group = f"g-{uuid.uuid4().hex[:8]}"
    nc = await nats_server_at(nats_url).connect("events")
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_message(msg: Any) -> None:
        await received.put(json.loads(msg.data))

    await nc.subscribe(session_events_subject(WORKSPACE, group), cb=on_message)
    await flush_in_order(nc)
    try:
        yield nc, group, received
    finally:
        await nc.close()


async def test_a_drain_under_a_viewer_publishes_the_new_epoch(
    events_runtime: Runtime, events: tuple[Any, str, asyncio.Queue[dict[str, Any]]]
) -> None:
    _nc, group, received = events
    leases = events_runtime.leases()
    cell = await leases.attach_viewer(WORKSPACE, group, plane="terminal", viewer_id="v1")
    view = await leases.drain(WORKSPACE, group, reason="operator", wait=True)
    event = await asyncio.wait_for(received.get(), 10)
    assert event["type"] == STREAM_URL_ROTATED and event["leaseId"] == cell.lease_id
    assert event["previousEpoch"] == cell.epoch and event["leaseEpoch"] == view.epoch > cell.epoch
    assert event["at"] and event["reason"] == "operator"  # the drain's reason
    # The viewer comes back (as `open` does on the event): the new box at the next epoch is not
    # itself a rotation, since no viewer had a stream of it yet.
    again = await leases.attach_viewer(WORKSPACE, group, plane="terminal", viewer_id="v1")
    assert again.epoch == view.epoch + 1
    await asyncio.sleep(0.3)
    assert received.empty()
    await leases.release(WORKSPACE, group, "v1", kind="viewer")
    await leases.drain(WORKSPACE, group, wait=True)
    # Patch stream-url-rotated-event: the event published, planes torn down with the box.
    await record_history(events_runtime, WORKSPACE, group, "viewer_drain_stream_url_rotated")


async def test_a_box_lost_under_a_viewer_publishes_the_new_epoch(
    events_runtime: Runtime, events: tuple[Any, str, asyncio.Queue[dict[str, Any]]]
) -> None:
    _nc, group, received = events
    leases = events_runtime.leases()
    cell = await leases.attach_viewer(WORKSPACE, group, plane="terminal")
    view = await leases.describe(WORKSPACE, group)
    assert view.envelope is not None
    registry = ProviderRegistry(events_runtime.settings)
    try:
        await registry.get("local").terminate(Envelope(**view.envelope.model_dump()))
    finally:
        await registry.aclose()
    lost = await leases.report_box_lost(WORKSPACE, group, cell.epoch, cell.instance_id)
    assert lost.lost
    event = await asyncio.wait_for(received.get(), 10)
    assert (event["previousEpoch"], event["leaseEpoch"]) == (cell.epoch, lost.epoch)
    assert "box lost" in event["reason"]


async def test_a_box_replaced_without_viewers_publishes_nothing(
    events_runtime: Runtime, events: tuple[Any, str, asyncio.Queue[dict[str, Any]]]
) -> None:
    _nc, group, received = events
    leases = events_runtime.leases()
    await leases.acquire(WORKSPACE, group, holder_id="turn-1")
    await leases.drain(WORKSPACE, group, wait=True)
    await leases.acquire(WORKSPACE, group, holder_id="turn-1")
    await leases.drain(WORKSPACE, group, wait=True)
    await asyncio.sleep(0.3)
    assert received.empty()
