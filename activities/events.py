"""Session events the lease publishes on NATS, for viewers that must react (``stream.url.rotated``).

When a lease's epoch changes while viewers watch it, the box they watch is gone or replaced and
their stream tokens are useless: the lease workflow then publishes ``stream.url.rotated`` on the
session's subject ``session.<workspace>.<group>.events`` (the subject Channel-A events use too),
and ``sandboxctl desktop|terminal open`` re-attach for a fresh cell at once instead of noticing at
their next heartbeat. The event is a JSON object::

    {"type": "stream.url.rotated", "leaseId": "lease/ws/group", "leaseEpoch": 8,
     "previousEpoch": 7, "at": "2025-01-01T12:00:00+00:00", "reason": "box lost (reported)"}

Publishing is best effort and never fails the lease: :meth:`SessionEventActivities.publish_session_event`
returns ``False`` (and logs why) when NATS is unreachable, the subject is malformed or the payload
is not JSON; it never raises. The NATS connection is made on first use from
``Settings.nats_url`` (a worker boots without NATS), and after a failed connect the activity
stops trying for ``retry_after`` seconds rather than making every event wait for a connect
timeout. The payload builders are pure so that the workflow can call them: they live in
:mod:`workflows.models.session_events`.

The dial goes through :func:`sandbox.nats_dial.dial_within`: the activity never waits on a dial
past the connect timeout or its own cancellation (a dial stuck in nats-py's connect loop once hung
the activity, and with it the worker's shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from temporalio import activity

from sandbox.nats_dial import dial_within, settle_abandoned_dials
from sandbox.settings import Settings
from workflows.activity_names import ActivityName

__all__ = ["SessionEventActivities"]

log = logging.getLogger("sandbox.events")

_TOKEN: Final = r"[^.*>\s]+"
_SUBJECT_RE: Final = re.compile(rf"session\.{_TOKEN}\.{_TOKEN}\.events")
_FLUSH_TIMEOUT_SECONDS: Final = 2.0
_ACLOSE_WAIT_SECONDS: Final = 2.0


async def _quiet(*_args: Any) -> None:
    # nats-py reports every reconnect attempt through its callbacks; outcomes reach callers as False.
    return None


class SessionEventActivities:
    """The session-event activity of a worker, with its lazily made NATS connection.

    Args:
        settings: Worker settings (``nats_url``).
        connect: Makes the NATS connection (tests inject one); default ``nats.connect`` to ``nats_url``.
        connect_timeout: Seconds one connect may take.
        retry_after: Seconds without connect attempts after a failed one.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        connect: Callable[[], Awaitable[Any]] | None = None,
        connect_timeout: float = 2.0,
        retry_after: float = 10.0,
    ) -> None:
        self._url = settings.nats_url
        self._settings = settings
        self._connect = connect or self._dial
        self._connect_timeout = connect_timeout
        self._retry_after = retry_after
        self._nc: Any = None
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()

    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        """The activities to register on the worker."""
        return [self.publish_session_event]

    async def _dial(self) -> Any:
        import nats

        from sandbox.nats_auth import NatsAuth

        # Read per dial: a missing credential is a failed connect (logged), never a failed lease.
        auth = NatsAuth.for_role(self._settings, "runtime")
        return await nats.connect(
            self._url,
            name="sandbox-runtime events",
            **auth.connect_options(),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=max(1, int(self._connect_timeout)),
            error_cb=_quiet,
            disconnected_cb=_quiet,
        )

    async def _connection(self) -> Any:
        nc = self._nc
        if nc is not None and not nc.is_closed:
            return nc
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                return self._nc
            if self._failed_at is not None and time.monotonic() - self._failed_at < self._retry_after:
                return None
            try:
                self._nc = await dial_within(self._connect, self._connect_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # nats-py raises several unrelated types for "cannot connect"
                self._failed_at = time.monotonic()
                log.warning(
                    "cannot reach NATS at %s (%s); session events are dropped for %gs",
                    self._url,
                    type(err).__name__,
                    self._retry_after,
                )
                return None
            self._failed_at = None
            return self._nc

    @activity.defn(name=ActivityName.PUBLISH_SESSION_EVENT)
    async def publish_session_event(self, subject: str, payload: dict[str, Any]) -> bool:
        """Publish ``payload`` as JSON on ``subject``; whether the server took it (never raises).

        ``subject`` must be ``session.<workspace>.<group>.events``. Failures (a malformed subject,
        a payload that is not JSON, NATS unreachable or not confirming within 2 s) are logged and
        return ``False``: a lost event costs a viewer one heartbeat interval, never the lease.
        """
        if not _SUBJECT_RE.fullmatch(subject):
            log.warning("not publishing a session event on malformed subject %r", subject[:200])
            return False
        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            log.warning("not publishing a session event that is not JSON: %s", err)
            return False
        nc = await self._connection()
        if nc is None:
            return False
        try:
            await nc.publish(subject, body)
            await nc.flush(timeout=_FLUSH_TIMEOUT_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning("publishing %s on %s failed: %s", _event_type(payload), subject, type(err).__name__)
            return False
        return True

    async def aclose(self) -> None:
        """Drain and close the connection, if one was made, and stop dials still running (bounded wait)."""
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        await settle_abandoned_dials(_ACLOSE_WAIT_SECONDS)


def _event_type(payload: Mapping[str, Any]) -> str:
    kind = payload.get("type")
    return kind if isinstance(kind, str) else "event"
