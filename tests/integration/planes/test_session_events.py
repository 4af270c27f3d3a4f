"""``publish_session_event`` against a real nats-server, and the CLI's feed reading what it publishes."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from activities.events import SessionEventActivities
from client.events import SessionEventFeed
from sandbox.nats_flush import flush_in_order
from sandbox.settings import Settings
from tests.conftest import nats_server_at
from workflows.models.session_events import session_events_subject, stream_url_rotated

pytestmark = pytest.mark.timeout(30)


async def test_a_rotation_reaches_subscribers_of_the_session_subject(nats_url: str) -> None:
    subject = session_events_subject("ws-events", f"g-{uuid.uuid4().hex[:8]}")
    nc = await nats_server_at(nats_url).connect("events")
    received: asyncio.Queue[Any] = asyncio.Queue()
    await nc.subscribe(subject, cb=received.put)
    await flush_in_order(nc)
    events = SessionEventActivities(Settings(nats_url=nats_url))
    payload = stream_url_rotated("lease/ws-events/g", 5, 4, datetime.now(UTC), reason="rotation")
    try:
        assert await events.publish_session_event(subject, payload)
        msg = await asyncio.wait_for(received.get(), 5)
        assert json.loads(msg.data) == payload
    finally:
        await events.aclose()
        await nc.close()


async def test_the_viewer_feed_hands_over_newer_epochs_only_of_rotations(nats_url: str) -> None:
    subject = session_events_subject("ws-events", f"g-{uuid.uuid4().hex[:8]}")
    epochs: list[int] = []
    feed = SessionEventFeed(nats_url, subject, epochs.append, auth=nats_server_at(nats_url).auth("events")).start()
    events = SessionEventActivities(Settings(nats_url=nats_url))
    try:
        await asyncio.wait_for(feed.subscribed.wait(), 5)
        assert await events.publish_session_event(subject, {"type": "fs.changed", "leaseEpoch": 9})
        assert await events.publish_session_event(subject, stream_url_rotated("l", 3, 2, datetime.now(UTC)))
        other = session_events_subject("ws-events", "someone-else")
        assert await events.publish_session_event(other, stream_url_rotated("l", 4, 3, datetime.now(UTC)))
        for _ in range(100):
            if epochs:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert epochs == [3]
    finally:
        await feed.aclose()
        await events.aclose()


async def test_without_nats_the_feed_reports_once_and_keeps_quiet() -> None:
    lines: list[str] = []
    feed = SessionEventFeed(
        "nats://127.0.0.1:1", "session.w.g.events", lambda _e: None, report=lines.append, connect_timeout=0.3
    ).start()
    for _ in range(200):
        if lines:
            break
        await asyncio.sleep(0.02)
    await feed.aclose()
    assert len(lines) == 1 and "heartbeat" in lines[0]
