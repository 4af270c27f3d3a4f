"""Session events without a server: payload shape, parsing hostile messages, and publishing that never fails."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activities.events import SessionEventActivities
from sandbox.settings import Settings
from workflows.models.session_events import (
    STREAM_URL_ROTATED,
    StreamUrlRotated,
    parse_stream_url_rotated,
    session_events_subject,
    stream_url_rotated,
)

AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_the_rotated_payload_has_the_fields_viewers_read() -> None:
    payload = stream_url_rotated("lease/ws/g", 8, 7, AT, reason="box lost (reported)")
    assert payload == {
        "type": "stream.url.rotated",
        "leaseId": "lease/ws/g",
        "leaseEpoch": 8,
        "previousEpoch": 7,
        "at": "2025-01-02T03:04:05+00:00",
        "reason": "box lost (reported)",
    }
    assert parse_stream_url_rotated(json.dumps(payload).encode()) == StreamUrlRotated(
        lease_epoch=8, previous_epoch=7, lease_id="lease/ws/g", reason="box lost (reported)"
    )


def test_the_subject_is_the_sessions_events_subject() -> None:
    assert session_events_subject("ws-1", "group-a") == "session.ws-1.group-a.events"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"not json",
        b"[]",
        b'{"type": "fs.changed", "leaseEpoch": 3}',
        b'{"type": "stream.url.rotated"}',
        b'{"type": "stream.url.rotated", "leaseEpoch": "3"}',
        b'{"type": "stream.url.rotated", "leaseEpoch": true}',
        b'{"type": "stream.url.rotated", "leaseEpoch": -1}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_other_events_and_garbage_are_not_rotations(message: bytes) -> None:
    assert parse_stream_url_rotated(message) is None


@settings(deadline=None)  # trivial work; a loaded machine must not fail it
@given(st.binary(max_size=300))
def test_parsing_never_raises(message: bytes) -> None:
    parse_stream_url_rotated(message)


@settings(deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=8), max_size=6))
def test_parsing_any_json_object_never_raises(doc: dict[str, Any]) -> None:
    event = parse_stream_url_rotated(json.dumps({**doc, "type": STREAM_URL_ROTATED}).encode())
    assert event is None or event.lease_epoch >= 0


class FakeNats:
    """Records publishes; optionally fails them."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.fail = fail
        self.is_closed = False

    async def publish(self, subject: str, body: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.append((subject, body))

    async def flush(self, timeout: float) -> None:
        return None

    async def drain(self) -> None:
        self.is_closed = True


def activities_with(nc: Any = None, *, error: Exception | None = None) -> tuple[SessionEventActivities, list[int]]:
    dials: list[int] = []

    async def connect() -> Any:
        dials.append(1)
        if error is not None:
            raise error
        return nc

    return SessionEventActivities(Settings(), connect=connect, retry_after=60), dials


async def test_an_event_is_published_as_compact_json_on_its_subject() -> None:
    nc = FakeNats()
    events, dials = activities_with(nc)
    payload = stream_url_rotated("lease/ws/g", 2, 1, AT)
    assert await events.publish_session_event("session.ws.g.events", payload)
    assert await events.publish_session_event("session.ws.g.events", payload)
    assert nc.published == [("session.ws.g.events", json.dumps(payload, separators=(",", ":")).encode())] * 2
    assert dials == [1]  # one lazy connection, reused
    await events.aclose()
    assert nc.is_closed


@pytest.mark.parametrize(
    "subject",
    ["session.ws.g", "session.w.s.g.events", "session.ws.*.events", "session.ws.>.events", "other.ws.g.events", ""],
)
async def test_a_malformed_subject_is_refused_without_connecting(subject: str) -> None:
    events, dials = activities_with(FakeNats())
    assert not await events.publish_session_event(subject, {"type": "x"})
    assert dials == []


async def test_a_payload_that_is_not_json_is_refused() -> None:
    nc = FakeNats()
    events, _ = activities_with(nc)
    assert not await events.publish_session_event("session.ws.g.events", {"at": AT})
    assert not await events.publish_session_event("session.ws.g.events", {"x": float("nan")})
    assert nc.published == []


async def test_an_unreachable_server_is_false_and_not_retried_on_every_event() -> None:
    events, dials = activities_with(error=OSError("connection refused"))
    started = time.monotonic()
    for _ in range(5):
        assert not await events.publish_session_event("session.ws.g.events", {"type": "x"})
    assert dials == [1] and time.monotonic() - started < 1


async def test_a_connect_that_hangs_is_cut_at_the_connect_timeout() -> None:
    async def hang() -> Any:
        await asyncio.sleep(60)

    events = SessionEventActivities(Settings(), connect=hang, connect_timeout=0.2)
    started = time.monotonic()
    assert not await events.publish_session_event("session.ws.g.events", {"type": "x"})
    assert time.monotonic() - started < 2


async def test_a_failing_publish_is_false_not_an_exception() -> None:
    events, _ = activities_with(FakeNats(fail=RuntimeError("connection closed")))
    assert not await events.publish_session_event("session.ws.g.events", {"type": "x"})


async def test_the_real_default_connection_to_nowhere_is_false() -> None:
    events = SessionEventActivities(Settings(nats_url="nats://127.0.0.1:1"), connect_timeout=0.3)
    assert not await events.publish_session_event("session.ws.g.events", {"type": "x"})
    await events.aclose()
