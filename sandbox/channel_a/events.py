"""Channel-A change events and where they go.

Every event carries the ``(leaseEpoch, revision)`` pair clients invalidate on: the lease epoch
names the box, the revision counts successful mutations of its workspace. :class:`EventSink` is
the one method a destination implements; :class:`NatsEventSink` publishes JSON on
``session.<workspace>.<session>.events`` and :class:`MemoryEventSink` keeps events for tests.
Publishing is best effort: Channel-A never fails an operation because an event was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, runtime_checkable

from sandbox.errors import InvalidRequest
from sandbox.nats_auth import NatsAuth
from sandbox.nats_dial import dial_within
from sandbox.nats_flush import flush_in_order

__all__ = [
    "EVENT_TYPES",
    "ChannelAEvent",
    "EventSink",
    "EventType",
    "MemoryEventSink",
    "NatsEventSink",
    "events_subject",
]

log = logging.getLogger("sandbox.channel_a.events")

EventType = Literal[
    "fs.changed",
    "git.changed",
    "terminal.pty.started",
    "terminal.pty.output.delta",
    "terminal.pty.exited",
    "sandbox.command.output.delta",
]
EVENT_TYPES: Final[tuple[str, ...]] = (
    "fs.changed",
    "git.changed",
    "terminal.pty.started",
    "terminal.pty.output.delta",
    "terminal.pty.exited",
    "sandbox.command.output.delta",
)
# A NATS subject token: no separators, wildcards or whitespace.
_SUBJECT_TOKEN_RE: Final = re.compile(r"[^.*>\s]+")


@dataclass(frozen=True)
class ChannelAEvent:
    """One event: its type, payload (camelCase keys, including ``leaseEpoch`` and ``revision``)."""

    type: EventType
    payload: dict[str, Any]
    lease_epoch: int
    revision: int
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self, *, workspace_id: str | None = None, session_id: str | None = None) -> dict[str, Any]:
        """The wire document: envelope fields plus the payload."""
        doc: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "at": self.at.isoformat(),
            "leaseEpoch": self.lease_epoch,
            "revision": self.revision,
            "payload": self.payload,
        }
        if workspace_id is not None:
            doc["workspaceId"] = workspace_id
        if session_id is not None:
            doc["sessionId"] = session_id
        return doc


@runtime_checkable
class EventSink(Protocol):
    """Where Channel-A events go."""

    async def publish(self, event: ChannelAEvent) -> None:
        """Deliver one event; may raise, the caller logs and drops the failure."""
        ...


class MemoryEventSink:
    """Keeps every event in order (for tests and in-process consumers)."""

    def __init__(self) -> None:
        self.events: list[ChannelAEvent] = []
        self._changed = asyncio.Condition()

    async def publish(self, event: ChannelAEvent) -> None:
        """Append the event and wake waiters."""
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of_type(self, event_type: str) -> list[ChannelAEvent]:
        """The events of one type, oldest first."""
        return [e for e in self.events if e.type == event_type]

    async def wait_for(self, predicate: Callable[[ChannelAEvent], bool], timeout: float = 5.0) -> ChannelAEvent:
        """The first event (already received or arriving within ``timeout``) matching ``predicate``.

        Raises:
            TimeoutError: no matching event arrived in time.
        """
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                await self._changed.wait()


def events_subject(workspace_id: str, session_id: str) -> str:
    """The NATS subject of a session's events, ``session.<workspace>.<session>.events``.

    Raises:
        InvalidRequest: an id is empty or holds ``.``, ``*``, ``>`` or whitespace, which would
            change the subject's shape.
    """
    for name, value in (("workspace id", workspace_id), ("session id", session_id)):
        if not _SUBJECT_TOKEN_RE.fullmatch(value):
            raise InvalidRequest(f"{name} {value!r} cannot be a NATS subject token (no '.', '*', '>' or spaces)")
    return f"session.{workspace_id}.{session_id}.events"


class NatsEventSink:
    """Publishes events as JSON on ``session.<workspace>.<session>.events``.

    Connects on first use. When the server cannot be reached the sink drops events for
    ``retry_after`` seconds instead of stalling every operation on a connect timeout.

    Args:
        nats_url: The server, for example ``nats://127.0.0.1:4222``.
        workspace_id: First subject token.
        session_id: Second subject token (the CLI uses the sandbox group).
        connect_timeout: Seconds to wait for a connection.
        retry_after: Seconds to wait after a failed connect before trying again.
        auth: The NATS identity to publish with (the runtime's; none on an open server).
    """

    def __init__(
        self,
        nats_url: str,
        *,
        workspace_id: str,
        session_id: str,
        connect_timeout: float = 2.0,
        retry_after: float = 30.0,
        auth: NatsAuth | None = None,
    ) -> None:
        self.nats_url = nats_url
        self._auth = auth or NatsAuth()
        self.workspace_id = workspace_id
        self.session_id = session_id
        self.subject = events_subject(workspace_id, session_id)
        self._connect_timeout = connect_timeout
        self._retry_after = retry_after
        self._nc: Any = None
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> Any:
        if self._nc is not None and self._nc.is_connected:
            return self._nc
        async with self._lock:
            if self._nc is not None and self._nc.is_connected:
                return self._nc
            if self._failed_at is not None and time.monotonic() - self._failed_at < self._retry_after:
                return None
            import nats

            async def quiet(*_args: Any) -> None:
                return None

            try:
                self._nc = await dial_within(
                    lambda: nats.connect(
                        servers=[self.nats_url],
                        connect_timeout=self._connect_timeout,
                        # nats-py retries a refused connect max_reconnect_attempts times, waiting
                        # reconnect_time_wait each (minutes by default); this sink retries on its own
                        # schedule (retry_after) instead.
                        max_reconnect_attempts=1,
                        reconnect_time_wait=0.1,
                        error_cb=quiet,
                        disconnected_cb=quiet,
                        **self._auth.connect_options(),
                    ),
                    2 * self._connect_timeout + 1,
                )
            except Exception as err:  # nats-py raises several unrelated types for "cannot connect"
                self._failed_at = time.monotonic()
                log.warning("cannot reach NATS at %s (%s); dropping Channel-A events for now", self.nats_url, err)
                return None
            self._failed_at = None
            return self._nc

    async def publish(self, event: ChannelAEvent) -> None:
        """Publish one event (dropped, with a warning, when NATS is unreachable)."""
        nc = await self._client()
        if nc is None:
            return
        body = json.dumps(
            event.to_json(workspace_id=self.workspace_id, session_id=self.session_id), separators=(",", ":")
        ).encode()
        await nc.publish(self.subject, body)

    async def flush(self) -> None:
        """Wait until the server has received everything published so far."""
        if self._nc is not None and self._nc.is_connected:
            await flush_in_order(self._nc)

    async def aclose(self) -> None:
        """Flush and disconnect."""
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
