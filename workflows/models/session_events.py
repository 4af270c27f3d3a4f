"""The session events the lease publishes on NATS (``stream.url.rotated``): subject and payloads.

Pure builders and a parser: the lease workflow builds the payload and hands it to the
``publish_session_event`` activity (:class:`activities.events.SessionEventActivities`), and a
viewer (``sandboxctl desktop|terminal open``) parses what it receives. The payload is a JSON
object::

    {"type": "stream.url.rotated", "leaseId": "lease/ws/group", "leaseEpoch": 8,
     "previousEpoch": 7, "at": "2025-01-01T12:00:00+00:00", "reason": "box lost (reported)"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

__all__ = [
    "STREAM_URL_ROTATED",
    "StreamUrlRotated",
    "parse_stream_url_rotated",
    "session_events_subject",
    "stream_url_rotated",
]

STREAM_URL_ROTATED: Final = "stream.url.rotated"
"""The event type viewers reconnect on."""


def session_events_subject(workspace_id: str, group_id: str) -> str:
    """The events subject of a lease's session, ``session.<workspace>.<group>.events``.

    Never raises (the workflow calls it): an id holding ``.``, ``*``, ``>`` or whitespace gives a
    subject of another shape, which :meth:`activities.events.SessionEventActivities.publish_session_event`
    refuses.
    """
    return f"session.{workspace_id}.{group_id}.events"


def stream_url_rotated(
    lease_id: str, epoch: int, previous_epoch: int, at: datetime, *, reason: str | None = None
) -> dict[str, Any]:
    """The ``stream.url.rotated`` payload for a lease that moved from ``previous_epoch`` to ``epoch``."""
    payload: dict[str, Any] = {
        "type": STREAM_URL_ROTATED,
        "leaseId": lease_id,
        "leaseEpoch": epoch,
        "previousEpoch": previous_epoch,
        "at": at.isoformat(),
    }
    if reason:
        payload["reason"] = reason
    return payload


@dataclass(frozen=True)
class StreamUrlRotated:
    """A ``stream.url.rotated`` event as a viewer reads it."""

    lease_epoch: int
    previous_epoch: int | None
    lease_id: str | None = None
    reason: str | None = None


def parse_stream_url_rotated(data: bytes) -> StreamUrlRotated | None:
    """The rotation an event message announces, or ``None`` for any other event or for garbage (never raises)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("type") != STREAM_URL_ROTATED:
        return None
    epoch = doc.get("leaseEpoch")
    previous = doc.get("previousEpoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return None
    if not isinstance(previous, int) or isinstance(previous, bool):
        previous = None
    lease_id = doc.get("leaseId")
    reason = doc.get("reason")
    return StreamUrlRotated(
        lease_epoch=epoch,
        previous_epoch=previous,
        lease_id=lease_id if isinstance(lease_id, str) else None,
        reason=reason if isinstance(reason, str) else None,
    )
