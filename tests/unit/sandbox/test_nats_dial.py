"""Dialling NATS: a caller that times out or is cancelled never waits on a dial that ignores it."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import nats

from sandbox.nats_dial import abandoned_dials, dial_within, settle_abandoned_dials


class DeafDial:
    """A dial that swallows its first cancellation and keeps dialling, as nats-py's connect loop can."""

    def __init__(self, seconds: float = 20.0, *, connects: bool = False) -> None:
        self.seconds = seconds
        self.connects = connects
        self.started = asyncio.Event()
        self.swallowed = 0
        self.closed = False

    async def __call__(self) -> Any:
        self.started.set()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1
                if self.connects:
                    return self  # "connected" just as the cancellation landed
        raise OSError("connection refused")

    async def close(self) -> None:
        self.closed = True


async def test_a_cancelled_caller_ends_at_once_and_the_dial_is_ended_apart() -> None:
    dial = DeafDial()
    caller = asyncio.create_task(dial_within(dial, 30))
    await asyncio.wait_for(dial.started.wait(), 5)
    started = time.monotonic()
    caller.cancel()
    done, _ = await asyncio.wait([caller], timeout=2)
    assert done and caller.cancelled() and time.monotonic() - started < 0.5
    assert await settle_abandoned_dials(2) and dial.swallowed == 1


async def test_a_dial_that_ignores_its_timeout_is_cut_at_the_timeout() -> None:
    started = time.monotonic()
    try:
        await dial_within(DeafDial(), 0.3)
    except TimeoutError as err:
        assert "0.3" in str(err)
    else:
        raise AssertionError("expected TimeoutError")
    assert time.monotonic() - started < 1.0
    assert await settle_abandoned_dials(2)


async def test_a_connection_made_after_the_caller_gave_up_is_closed() -> None:
    dial = DeafDial(connects=True)
    caller = asyncio.create_task(dial_within(dial, 30))
    await asyncio.wait_for(dial.started.wait(), 5)
    caller.cancel()
    await asyncio.wait([caller], timeout=2)
    assert await settle_abandoned_dials(2) and dial.closed


async def test_a_dial_in_time_returns_its_connection_and_its_error() -> None:
    async def ok() -> str:
        return "connection"

    async def refused() -> str:
        raise ConnectionRefusedError("no server")

    assert await dial_within(ok, 1) == "connection"
    try:
        await dial_within(refused, 1)
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("expected the dial's own error")
    assert abandoned_dials() == 0


async def test_real_nats_dials_to_an_absent_server_all_end_when_cancelled_at_random() -> None:
    """nats-py against a closed port, reconnecting for ever, cancelled at random while the loop stalls."""
    rng = random.Random(7)
    busy = True

    async def load() -> None:
        # Stalls of the event loop make a cancellation and a refused connection land in one iteration.
        while busy:
            await asyncio.sleep(rng.uniform(0, 0.05))
            time.sleep(rng.choice((0.001, 0.01, 0.05)))

    async def quiet(*_args: Any) -> None:
        return None

    async def cancelled_dial() -> bool:
        caller = asyncio.create_task(
            dial_within(
                lambda: nats.connect(
                    "nats://127.0.0.1:1",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.05,
                    connect_timeout=1,
                    error_cb=quiet,
                    disconnected_cb=quiet,
                ),
                30,
            )
        )
        await asyncio.sleep(rng.uniform(0, 1.5))
        caller.cancel()
        done, _ = await asyncio.wait([caller], timeout=2)
        return bool(done)

    loader = asyncio.create_task(load())
    try:
        ended = await asyncio.gather(*(cancelled_dial() for _ in range(150)))
    finally:
        busy = False
        await loader
    assert ended.count(False) == 0, f"{ended.count(False)} of {len(ended)} cancelled callers never returned"
    assert await settle_abandoned_dials(10), f"{abandoned_dials()} dials still running"
