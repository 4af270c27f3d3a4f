"""``sandboxctl terminal open`` as a person runs it, against the real worker: renewal, rotation, release."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import websockets

from activities.events import SessionEventActivities
from sandbox.settings import Settings
from tests.conftest import REPO, Runtime, nats_identity_env
from workflows.models.session_events import session_events_subject, stream_url_rotated

pytestmark = pytest.mark.timeout(90)

WORKSPACE = "ws-open"
_SCREEN_TEXT = "(document.querySelector('#term .xterm-rows') || {innerText: ''}).innerText"


@dataclass
class OpenCommand:
    """A running ``sandboxctl terminal open`` and what it printed."""

    proc: asyncio.subprocess.Process
    page_url: str
    stderr_path: Path

    def cell(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.page_url + "cell.json", timeout=5) as response:
            cell: dict[str, Any] = json.loads(response.read())
        return cell

    def notes(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 15)


@contextlib.asynccontextmanager
async def terminal_open(
    runtime: Runtime,
    nats_url: str,
    group: str,
    viewer_id: str,
    tmp_path: Path,
    *options: str,
    **env: str,
) -> AsyncIterator[OpenCommand]:
    s = runtime.settings
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("SANDBOX_")}
    environ.update(
        {
            "SANDBOX_DATA_DIR": str(s.data_dir),  # the same root secret as the worker's
            "SANDBOX_TEMPORAL_ADDRESS": runtime.client.service_client.config.target_host,
            "SANDBOX_TASK_QUEUE": s.task_queue,
            "SANDBOX_NATS_URL": nats_url,
            **nats_identity_env(),
            "PYTHONPATH": str(REPO),
            **env,
        }
    )
    stderr_path = tmp_path / f"open-{viewer_id}.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            "terminal",
            "open",
            WORKSPACE,
            group,
            "--viewer",
            viewer_id,
            *options,
            cwd=REPO,
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 45)
        assert line.startswith(b"http://127.0.0.1:"), (line, stderr_path.read_text())
        yield OpenCommand(proc, line.decode().strip(), stderr_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _viewer_holders(runtime: Runtime, group: str) -> list[str]:
    view = await runtime.leases().describe(WORKSPACE, group)
    return [h.holder_id for h in view.holders if h.kind == "viewer"]


async def _admitted(cell: dict[str, Any]) -> bool:
    async with websockets.connect(cell["url"], subprotocols=["tty", cell["token"]]) as ws:  # type: ignore[list-item]
        return ws.subprotocol == "tty"


async def test_open_renews_the_token_before_it_expires_and_releases_the_viewer_on_exit(
    runtime: Runtime, nats_url: str, tmp_path: Path
) -> None:
    leases = runtime.leases()
    group, viewer = f"g-{uuid.uuid4().hex[:8]}", f"viewer-{uuid.uuid4().hex[:8]}"
    await leases.acquire(WORKSPACE, group, holder_id="turn-1")
    try:
        async with terminal_open(
            runtime, nats_url, group, viewer, tmp_path, SANDBOX_STREAM_TOKEN_TTL_SECONDS="3"
        ) as cmd:
            first = await asyncio.to_thread(cmd.cell)
            assert first["viewer_id"] == viewer and first["token"] not in cmd.page_url
            assert await _viewer_holders(runtime, group) == [viewer]
            expires = datetime.fromisoformat(first["expires_at"])
            renewed = first
            while renewed["token"] == first["token"]:
                assert datetime.now(UTC) < expires, "the token expired before it was renewed"
                await asyncio.sleep(0.1)
                renewed = await asyncio.to_thread(cmd.cell)
            assert datetime.fromisoformat(renewed["expires_at"]) > expires
            assert renewed["epoch"] == first["epoch"] and await _admitted(renewed)
            assert renewed["mode"] == "view"  # without --control
            assert await cmd.stop(signal.SIGINT) == 0
            assert "viewer released" in cmd.notes()
        assert await _viewer_holders(runtime, group) == []
    finally:
        await leases.release(WORKSPACE, group, "turn-1")


async def test_a_rotated_lease_reconnects_the_open_page_to_the_new_box(
    runtime: Runtime, nats_url: str, browser: Any, tmp_path: Path
) -> None:
    leases = runtime.leases()
    group, viewer = f"g-{uuid.uuid4().hex[:8]}", f"viewer-{uuid.uuid4().hex[:8]}"
    grant = await leases.acquire(WORKSPACE, group, holder_id="turn-1")
    # A 60 s holder TTL makes the command heartbeat every 20 s: a quicker reaction is the event's.
    # --control: the page types into the new box's terminal at the end.
    async with terminal_open(
        runtime, nats_url, group, viewer, tmp_path, "--control", SANDBOX_HOLDER_TTL_SECONDS="60"
    ) as cmd:
        before = await asyncio.to_thread(cmd.cell)
        assert before["mode"] == "control"
        page = await browser.new_page(viewport={"width": 1000, "height": 700})
        await page.goto(cmd.page_url)
        await page.wait_for_function("window.viewerState === 'connected'", timeout=15000)

        # The box goes away (every holder dropped, epoch bumped), and the lease says so.
        drained = await leases.drain(WORKSPACE, group, wait=True)
        assert drained.epoch > before["epoch"]
        events = SessionEventActivities(Settings(nats_url=nats_url))
        started = time.monotonic()
        try:
            rotated = stream_url_rotated(grant.lease_id, drained.epoch, before["epoch"], datetime.now(UTC))
            assert await events.publish_session_event(session_events_subject(WORKSPACE, group), rotated)
        finally:
            await events.aclose()

        after = before
        while after["epoch"] <= drained.epoch:  # re-attached: a new box at the next epoch
            assert time.monotonic() - started < 15, cmd.notes()
            await asyncio.sleep(0.1)
            after = await asyncio.to_thread(cmd.cell)
        assert "re-attached (stream.url.rotated)" in cmd.notes()
        assert after["url"] != before["url"] or after["instance_id"] != before["instance_id"]
        assert await _viewer_holders(runtime, group) == [viewer]

        # The page noticed the new cell on its own and the new box's terminal works.
        await page.wait_for_function(
            f"window.viewerEpoch === {after['epoch']} && window.viewerState === 'connected'", timeout=15000
        )
        await page.wait_for_function(f"{_SCREEN_TEXT}.trim().length > 0", timeout=10000)
        await page.click("#term")
        await page.keyboard.type("echo marker-$((6*7))")
        await page.keyboard.press("Enter")
        await page.wait_for_function(f"{_SCREEN_TEXT}.includes('marker-42')", timeout=10000)
        await page.close()

        assert await cmd.stop(signal.SIGTERM) == 0
    assert await _viewer_holders(runtime, group) == []
