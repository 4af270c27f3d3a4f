"""Viewer sessions: one viewer's cell (edge URL + stream token) kept valid and current for as long as it watches.

A viewer cell (:class:`~client.lease_client.ViewerCell`) is short-lived: its token expires, and the
lease may replace its box (a new epoch, a new URL). :class:`ViewerSession` keeps it fresh:

- it renews the token by re-attaching (same viewer id, which also refreshes the viewer holder)
  ``min(renew_margin, a quarter of its lifetime)`` before it expires;
- in between it heartbeats the viewer holder; a heartbeat refused with ``StaleEpoch`` or
  ``HolderNotFound`` means the box was replaced or the viewer dropped: it re-attaches at once;
- :meth:`ViewerSession.notice_rotation` (fed by :class:`client.events.SessionEventFeed`)
  re-attaches at once when an event names an epoch newer than the cell's;
- a failed re-attach keeps the old cell and is retried with exponential backoff (``tenacity``)
  up to :data:`RETRY_MAX_SECONDS` between attempts;
- stopped, it releases the viewer holder.

:meth:`ViewerSession.for_lease` wires it to a :class:`~client.lease_client.LeaseClient`; the
constructor takes the three lease calls as plain callables so the loop is testable without Temporal.

Example::

    session = ViewerSession.for_lease(leases, "ws1", "g1", plane="desktop")
    cell = await session.start()
    await session.run(stop)  # until stop is set; session.cell is always the current cell
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from client.lease_client import HEARTBEAT_INTERVAL_SECONDS, LeaseClient, ViewerCell
from sandbox.errors import HolderNotFound, SandboxError, StaleEpoch

__all__ = ["RENEW_MARGIN_SECONDS", "RETRY_MAX_SECONDS", "Plane", "ViewMode", "ViewerSession", "cell_document"]

Plane = Literal["desktop", "terminal"]
ViewMode = Literal["view", "control"]

RENEW_MARGIN_SECONDS = 30.0
"""Renew a token this long before it expires (a quarter of its lifetime when that is shorter)."""
RETRY_MAX_SECONDS = 10.0
"""Longest wait between attempts to re-attach after a failure."""
_MIN_WAIT_SECONDS = 0.5
"""No timer of the session fires sooner than this after the last one (a nearly expired token, a short TTL)."""


def cell_document(cell: ViewerCell, *, with_token: bool) -> dict[str, Any]:
    """The cell as a JSON-able dict (what a viewer page reads); the token only when ``with_token``."""
    data: dict[str, Any] = cell.model_dump(mode="json")
    if not with_token:
        data.pop("token", None)
    return data


class ViewerSession:
    """Keeps one viewer's cell valid and current for as long as :meth:`run` runs, then releases the viewer.

    Args:
        attach: Attaches the viewer (idempotent) and returns a fresh cell.
        heartbeat: Heartbeats the viewer holder of a cell; returns the holder's new expiry, if known.
        release: Releases the viewer holder.
        heartbeat_interval: Seconds between heartbeats (shortened to a third of the holder's TTL
            once a heartbeat reports its expiry).
        renew_margin: Renew this long before the token expires, at most.
        report: Called with a short line whenever the cell changes or something fails.
    """

    def __init__(
        self,
        attach: Callable[[], Awaitable[ViewerCell]],
        heartbeat: Callable[[ViewerCell], Awaitable[datetime | None]],
        release: Callable[[], Awaitable[object]],
        *,
        heartbeat_interval: float,
        renew_margin: float = RENEW_MARGIN_SECONDS,
        report: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self._attach = attach
        self._heartbeat = heartbeat
        self._release = release
        self._interval = heartbeat_interval
        self._margin = renew_margin
        self._report = report
        self._cell: ViewerCell | None = None
        self.attaches = 0
        self._rotated = asyncio.Event()
        self._rotated_to = 0
        self._renew_at = 0.0
        self._beat_at = 0.0

    @classmethod
    def for_lease(
        cls,
        leases: LeaseClient,
        workspace_id: str,
        group_id: str,
        *,
        plane: Plane,
        viewer_id: str | None = None,
        subject: str | None = None,
        geometry: str = "1280x800",
        mode: ViewMode = "view",
        report: Callable[[str], None] = lambda _line: None,
    ) -> ViewerSession:
        """A session that attaches, heartbeats and releases viewer ``viewer_id`` (default: a new uuid) of a lease.

        The heartbeat interval is the viewer kind's, at most a third of the holder TTL of ``leases``' settings.
        """
        viewer = viewer_id or str(uuid.uuid4())

        async def attach() -> ViewerCell:
            return await leases.attach_viewer(
                workspace_id, group_id, viewer_id=viewer, subject=subject, plane=plane, geometry=geometry, mode=mode
            )

        async def heartbeat(cell: ViewerCell) -> datetime | None:
            result = await leases.heartbeat(workspace_id, group_id, cell.viewer_id, cell.epoch, kind="viewer")
            return result.expires_at

        async def release() -> object:
            return await leases.release(workspace_id, group_id, viewer, kind="viewer")

        interval = min(HEARTBEAT_INTERVAL_SECONDS["viewer"], leases.settings.holder_ttl_seconds / 3)
        return cls(attach, heartbeat, release, heartbeat_interval=interval, report=report)

    @property
    def cell(self) -> ViewerCell:
        """The current cell.

        Raises:
            RuntimeError: :meth:`start` has not attached yet.
        """
        if self._cell is None:
            raise RuntimeError("the viewer session has not started: await start() first")
        return self._cell

    def snapshot(self) -> dict[str, Any]:
        """The current cell as a viewer page reads it (token included)."""
        return cell_document(self.cell, with_token=True)

    async def start(self) -> ViewerCell:
        """The first attach (errors propagate: there is nothing to show yet)."""
        self._adopt(await self._attach())
        return self.cell

    def notice_rotation(self, epoch: int) -> None:
        """An event says the lease moved to ``epoch``: re-attach if that is newer than the cell's."""
        if self._cell is not None and epoch > self._cell.epoch:
            self._rotated_to = max(self._rotated_to, epoch)
            self._rotated.set()

    def _adopt(self, cell: ViewerCell) -> None:
        now = asyncio.get_running_loop().time()
        left = (cell.expires_at - datetime.now(UTC)).total_seconds()
        self._renew_at = now + max(left - min(self._margin, left / 4), _MIN_WAIT_SECONDS)
        self._beat_at = now + self._interval
        self._cell = cell
        self.attaches += 1
        if cell.epoch >= self._rotated_to:
            self._rotated.clear()  # a rotation noticed while re-attaching is already handled

    async def _reattach(self, why: str) -> None:
        """Re-attach until it works (the old cell stays current meanwhile); cancellable at any point."""
        # Due now until adopted: a re-attach cut short by stop() is taken up again by the next run().
        self._renew_at = asyncio.get_running_loop().time()
        before = self._cell

        def failed(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            detail = f"{err.error_type}: {err.message}" if isinstance(err, SandboxError) else repr(err)
            self._report(f"re-attaching ({why}) failed: {detail}; retrying in {wait:g}s")

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(SandboxError),
            wait=wait_exponential(multiplier=1, min=1, max=RETRY_MAX_SECONDS),
            before_sleep=failed,
            reraise=True,
        )
        cell: ViewerCell = await retrying(self._attach)
        self._adopt(cell)
        if before is None or cell.epoch != before.epoch or cell.url != before.url:
            was = before.epoch if before is not None else None
            self._report(f"re-attached ({why}): epoch {was} -> {cell.epoch}, {cell.url}")

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            expires = await self._heartbeat(self.cell)
        except (StaleEpoch, HolderNotFound) as err:
            await self._reattach(f"heartbeat: {err.error_type}")
            return
        except SandboxError as err:  # transient: the holder's TTL decides, and the next beat retries
            self._report(f"heartbeat failed: {err.error_type}: {err.message}")
            self._beat_at = loop.time() + min(self._interval, RETRY_MAX_SECONDS)
            return
        interval = self._interval
        if expires is not None:
            interval = max(_MIN_WAIT_SECONDS, min(interval, (expires - datetime.now(UTC)).total_seconds() / 3))
        self._beat_at = loop.time() + interval

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the cell fresh until ``stop`` is set; then release the viewer holder (best effort)."""
        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                wake = min(self._renew_at, self._beat_at) - loop.time()
                rotated = asyncio.ensure_future(self._rotated.wait())
                await asyncio.wait({stopped, rotated}, timeout=max(wake, 0), return_when=asyncio.FIRST_COMPLETED)
                rotated.cancel()
                if stop.is_set():
                    break
                # Each step may wait on Temporal (a re-attach waits for a new box): stopping must not.
                step = asyncio.ensure_future(self._step(loop.time()))
                await asyncio.wait({stopped, step}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await step
                elif not step.cancelled() and (failure := step.exception()) is not None:
                    raise failure  # not a SandboxError (those are retried): a bug, not an outage
        finally:
            stopped.cancel()
            with contextlib.suppress(SandboxError):
                await self._release()

    async def _step(self, now: float) -> None:
        if self._rotated.is_set():
            self._rotated.clear()
            await self._reattach("stream.url.rotated")
        elif now >= self._renew_at:
            await self._reattach("token renewal")
        elif now >= self._beat_at:
            await self._beat()
