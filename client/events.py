"""Session event feeds: follow a lease's session events on NATS and hand the rotations to a callback.

The worker publishes a session's events on ``session.<workspace>.<group>.events``; a
``stream.url.rotated`` event says the lease moved to a new box (a new epoch, a new stream URL).
:class:`SessionEventFeed` follows that subject so a viewer can re-attach at once instead of at its
next heartbeat. It is optional by design: without NATS, viewers still learn of a new epoch from
their heartbeat, so the feed connects in the background, keeps retrying, and never fails its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from sandbox.nats_auth import NatsAuth
from sandbox.nats_flush import flush_in_order
from sandbox.settings import Settings
from workflows.models.session_events import parse_stream_url_rotated, session_events_subject

__all__ = ["SessionEventFeed"]


class SessionEventFeed:
    """Follows a session's NATS events subject and hands each ``stream.url.rotated`` epoch to ``on_rotated``.

    Args:
        nats_url: The NATS server.
        subject: ``session.<workspace>.<group>.events``.
        on_rotated: Called with the new lease epoch of each rotation event.
        report: Called with a short line when NATS cannot be reached.
        retry_after: Seconds between connect attempts.
        connect_timeout: Seconds one connect attempt may take.
        auth: The read-only event identity (``NatsAuth.for_role(settings, "events")``).
    """

    def __init__(
        self,
        nats_url: str,
        subject: str,
        on_rotated: Callable[[int], None],
        *,
        report: Callable[[str], None] = lambda _line: None,
        retry_after: float = 10.0,
        connect_timeout: float = 3.0,
        auth: NatsAuth | None = None,
    ) -> None:
        self.nats_url = nats_url
        self._auth = auth or NatsAuth()
        self.subject = subject
        self._on_rotated = on_rotated
        self._report = report
        self._retry_after = retry_after
        self._connect_timeout = connect_timeout
        self._task: asyncio.Task[None] | None = None
        self._nc: Any = None  # nats.aio.client.Client (nats-py ships no types)
        self.subscribed = asyncio.Event()

    @classmethod
    def for_lease(
        cls,
        settings: Settings,
        workspace_id: str,
        group_id: str,
        on_rotated: Callable[[int], None],
        *,
        report: Callable[[str], None] = lambda _line: None,
    ) -> SessionEventFeed:
        """A feed of lease ``workspace_id/group_id``'s session on the settings' NATS, as the events role (if any)."""
        return cls(
            settings.nats_url,
            session_events_subject(workspace_id, group_id),
            on_rotated,
            report=report,
            auth=NatsAuth.best_effort(settings, "events"),
        )

    def start(self) -> SessionEventFeed:
        """Begin connecting and following in the background."""
        self._task = asyncio.ensure_future(self._follow())
        return self

    async def _follow(self) -> None:
        import nats

        from sandbox.nats_dial import dial_within

        async def quiet(*_args: Any) -> None:
            return None

        async def on_message(msg: Any) -> None:
            event = parse_stream_url_rotated(msg.data)
            if event is not None:
                self._on_rotated(event.lease_epoch)

        warned = False
        while self._nc is None:
            try:
                self._nc = await dial_within(
                    lambda: nats.connect(
                        self.nats_url,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        connect_timeout=max(1, int(self._connect_timeout)),
                        error_cb=quiet,
                        disconnected_cb=quiet,
                        **self._auth.connect_options(),
                    ),
                    self._connect_timeout,
                )
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not warned:
                    self._report(
                        f"no session events from NATS at {self.nats_url} ({type(err).__name__}); "
                        "a replaced box is noticed at the next heartbeat"
                    )
                    warned = True
                await asyncio.sleep(self._retry_after)
        await self._nc.subscribe(self.subject, cb=on_message)
        await flush_in_order(self._nc)
        self.subscribed.set()

    async def aclose(self) -> None:
        """Stop following and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
