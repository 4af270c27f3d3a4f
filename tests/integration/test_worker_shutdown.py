"""The worker stops within seconds after a drain that follows desktop activity.

Desktop activity (a screenshot) puts the desktop plane up, so the drain's epoch bump publishes
``stream.url.rotated`` on NATS. The publish activity dials NATS lazily; nats-py's connect loop can
swallow a cancellation and go on dialling, and a worker stopped while that publish was in flight
used to wait on the activity without end (the dial itself is tested in
``tests/unit/sandbox/test_nats_dial.py``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from activities.events import SessionEventActivities
from sandbox.failures import call_workflow
from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, running_runtime
from workflows.models.computer_use import DesktopInputRequest, DesktopInputResult, Screenshot, ScreenshotRequest

pytestmark = pytest.mark.timeout(120)

SUBJECT = "session.ws.g.events"
DEAF_SECONDS = 20.0


class DeafDial:
    """A NATS dial that swallows its first cancellation and keeps dialling, as nats-py's loop can."""

    def __init__(self, seconds: float = DEAF_SECONDS) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self.swallowed = 0

    async def __call__(self, *_args: Any) -> Any:
        self.started.set()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1
        raise OSError("connection refused")


async def test_the_worker_stops_promptly_after_a_drain_that_follows_desktop_activity(
    temporal_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dial = DeafDial()
    monkeypatch.setattr(SessionEventActivities, "_dial", dial)
    settings = Settings(data_dir=tmp_path / "data", task_queue=f"test-shutdown-{uuid.uuid4()}", **FAST_TIMERS)
    ws, group = f"ws-sd-{uuid.uuid4().hex[:6]}", "g1"
    runtime = running_runtime(temporal_client, settings)
    rt = await runtime.__aenter__()
    try:
        leases: Any = rt.leases()
        async with leases.hold(ws, group):
            handle = leases.handle(ws, group)
            shot = await call_workflow(
                lambda: handle.execute_update("screenshot", ScreenshotRequest(), result_type=Screenshot)
            )
            assert shot.png.startswith(b"\x89PNG")
            click = DesktopInputRequest.model_validate({"actions": [{"action": "click", "x": 5, "y": 5}]})
            await call_workflow(lambda: handle.execute_update("desktop_input", click, result_type=DesktopInputResult))
        assert (await leases.drain(ws, group, wait=True)).liveness == "cold"
        # The drain's rotation event is being published (the desktop was up) while the worker stops.
        await asyncio.wait_for(dial.started.wait(), 10)
    finally:
        started = time.monotonic()
        await runtime.__aexit__(None, None, None)
        stopped_in = time.monotonic() - started
    assert stopped_in < 5, f"the worker took {stopped_in:.1f} s to stop"
