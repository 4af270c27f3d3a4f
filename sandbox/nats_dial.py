"""Dialling NATS without ever waiting on a dial that ignores its cancellation.

nats-py's connect loop can turn a cancellation that lands together with a refused connection into
one more retry (it catches the resulting error and dials again; with ``max_reconnect_attempts=-1``
for ever). ``asyncio.wait_for(nats.connect(...), t)`` waits for the inner dial to finish cancelling,
so a caller that timed out or was cancelled hung with it: a worker's shutdown waited without end on
an activity stuck there. :func:`dial_within` runs the dial as a task of its own and waits only for
its result. On timeout or cancellation the dial is abandoned: cancelled again every 0.1 s until it
ends (a swallowed cancellation is not repeated by anyone else), and a connection it makes after all
is closed. Every NATS client of the runtime dials through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

__all__ = ["abandoned_dials", "dial_within", "settle_abandoned_dials"]

T = TypeVar("T")

_RECANCEL_SECONDS: Final = 0.1
_reapers: set[asyncio.Task[None]] = set()


async def dial_within(connect: Callable[[], Awaitable[T]], timeout: float) -> T:
    """The connection ``connect()`` makes, within ``timeout`` seconds.

    Raises:
        TimeoutError: No connection within ``timeout`` (the dial goes on being cancelled apart).
        Exception: Whatever ``connect()`` raised when it failed in time.
    """
    dial: asyncio.Future[T] = asyncio.ensure_future(connect())
    try:
        done, _ = await asyncio.wait([dial], timeout=timeout)
    except asyncio.CancelledError:
        _abandon(dial)
        raise
    if not done:
        _abandon(dial)
        raise TimeoutError(f"no NATS connection within {timeout:g} s")
    return dial.result()


def _abandon(dial: asyncio.Future[Any]) -> None:
    reaper = asyncio.get_running_loop().create_task(_reap(dial))
    _reapers.add(reaper)
    reaper.add_done_callback(_reapers.discard)


async def _reap(dial: asyncio.Future[Any]) -> None:
    while not dial.done():
        dial.cancel()
        await asyncio.wait([dial], timeout=_RECANCEL_SECONDS)
    if dial.cancelled() or dial.exception() is not None:
        return
    # It connected after all and nobody holds the connection.
    with contextlib.suppress(Exception):
        await dial.result().close()


def abandoned_dials() -> int:
    """How many abandoned dials are still being ended."""
    return len(_reapers)


async def settle_abandoned_dials(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every abandoned dial to end; whether they all did."""
    if _reapers:
        await asyncio.wait(list(_reapers), timeout=timeout)
    return not _reapers
