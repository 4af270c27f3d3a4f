"""The in-box edge, as remote backends' boxes run it: key on stdin, ``--epoch``, view and control servers.

Remote boxes (Docker, the clouds) run the edge inside the box through the same scripts. A local
box of ``SANDBOX_LOCAL_ISOLATION=none`` sees the host's file system and network, so it runs them
the same way: that is how this is tested without a cloud (an isolated local box cannot run the
runtime's code, and its edge runs on the host instead: see test_modes.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from sandbox.inbox_scripts import (
    BOX_TOOLS_BIN,
    ScriptName,
    host_edge_environment,
    parse_desktop_up,
    parse_terminal_up,
)
from sandbox.stream_token import derive_lease_key
from tests.conftest import session_scratch_dir, unmount_box_disks
from tests.integration.planes.harness import X_ENV, Box, PlaneHarness, Rfb, plane_harness, pointer_at

pytestmark = pytest.mark.timeout(90)


@dataclass
class InBox:
    box: Box
    desktop: int
    terminal: int


async def _up(planes: PlaneHarness, box: Box, script: ScriptName, epoch: int, **env: str) -> str:
    key = derive_lease_key(planes.root, box.lease_id, epoch).hex()
    result = await box.session.exec(
        box.layout.scripts.command(script),
        env={**host_edge_environment(), "SANDBOX_EDGE_KEY_STDIN": "1", "SANDBOX_EDGE_EPOCH": str(epoch), **env},
        stdin=f"{key}\n".encode(),
        timeout=50,
    )
    out = result.stdout.decode()
    assert result.exit_code == 0, (out, result.stderr.decode())
    return out


@pytest.fixture(scope="module")
async def planes() -> AsyncIterator[PlaneHarness]:
    """Boxes that share the host's file system and network, as a remote backend's box has its own."""
    # A short directory: in these boxes the X, VNC and ttyd unix sockets have host paths (108 bytes at
    # most), and pytest's own directories grow with the run number.
    base = session_scratch_dir("sandbox-ib-", "/tmp")
    try:
        async with plane_harness(base, local_isolation="none") as harness:
            yield harness
    finally:
        unmount_box_disks((str(base) + "/",))
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
async def inbox(planes: PlaneHarness) -> AsyncIterator[InBox]:
    box = await planes.box()
    assert box.layout.scripts.directory != BOX_TOOLS_BIN
    desktop = parse_desktop_up(await _up(planes, box, "desktop-up", box.epoch, STREAM_PORT="0", DESKTOP_W="800"))
    terminal = parse_terminal_up(await _up(planes, box, "terminal-up", box.epoch, TERMINAL_PORT="0"))
    assert desktop is not None and desktop.port > 0 and terminal is not None and terminal.port > 0
    yield InBox(box, desktop.port, terminal.port)


async def test_the_inbox_edge_routes_by_mode_and_refuses_other_epochs(planes: PlaneHarness, inbox: InBox) -> None:
    box = inbox.box
    url = f"ws://127.0.0.1:{inbox.desktop}/"
    result = await box.session.exec(box.layout.scripts.command("desktop-up", "--status"), timeout=30)
    assert result.exit_code == 0 and b"websockify=up" in result.stdout and b"x11vnc_view=up" in result.stdout
    assert (box.state_dir / "key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidStatus):
        token = planes.mint(box.lease_id, box.epoch + 1, mode="control")
        async with websockets.connect(url, subprotocols=["binary", token]):  # type: ignore[list-item]
            pass

    assert (await box.sh(X_ENV + "xdotool mousemove 10 10"))[0] == 0
    view = planes.mint(box.lease_id, box.epoch, mode="view")
    async with websockets.connect(url, subprotocols=["binary", view]) as ws:  # type: ignore[list-item]
        rfb = Rfb(ws)
        await rfb.handshake()
        await rfb.pointer(222, 111)
        await asyncio.sleep(0.7)
    assert await pointer_at(box) == (10, 10)
    control = planes.mint(box.lease_id, box.epoch, mode="control")
    async with websockets.connect(url, subprotocols=["binary", control]) as ws:  # type: ignore[list-item]
        rfb = Rfb(ws)
        await rfb.handshake()
        await rfb.pointer(222, 111)
        deadline = time.monotonic() + 5
        while await pointer_at(box) != (222, 111) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert await pointer_at(box) == (222, 111)


async def test_the_inbox_terminal_edge_drops_view_keystrokes(planes: PlaneHarness, inbox: InBox) -> None:
    box = inbox.box
    url = f"ws://127.0.0.1:{inbox.terminal}/"
    for mode, reaches in (("view", False), ("control", True)):
        mark = f"/tmp/{mode}-{secrets.token_hex(3)}"
        token = planes.mint(box.lease_id, box.epoch, plane="terminal", mode=mode)
        async with websockets.connect(url, subprotocols=["tty", token]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"AuthToken": "", "columns": 80, "rows": 24}).encode())
            await asyncio.sleep(0.5)
            await ws.send(f"0touch {mark}\r".encode())
            deadline = time.monotonic() + (5 if reaches else 1.5)
            while (await box.sh(f"test -e {mark}"))[0] != 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        assert ((await box.sh(f"test -e {mark}"))[0] == 0) is reaches, mode


async def test_a_new_epoch_restarts_the_inbox_edge_on_its_port(planes: PlaneHarness, inbox: InBox) -> None:
    box = inbox.box
    out = await _up(planes, box, "desktop-up", box.epoch + 1, STREAM_PORT="0")
    up = parse_desktop_up(out)
    assert up is not None and not up.already and up.port == inbox.desktop
    url = f"ws://127.0.0.1:{up.port}/"
    old = planes.mint(box.lease_id, box.epoch, mode="control")
    with pytest.raises(InvalidStatus):
        async with websockets.connect(url, subprotocols=["binary", old]):  # type: ignore[list-item]
            pass
    new = planes.mint(box.lease_id, box.epoch + 1, mode="control")
    async with websockets.connect(url, subprotocols=["binary", new]) as ws:  # type: ignore[list-item]
        assert await asyncio.wait_for(ws.recv(), 5) == b"RFB 003.008\n"
    # Already up for that epoch: the lock-free path answers.
    again = parse_desktop_up(await _up(planes, box, "desktop-up", box.epoch + 1, STREAM_PORT="0"))
    assert again is not None and again.already and again.port == up.port


async def test_an_inbox_edge_is_stopped_once_the_edge_runs_outside(planes: PlaneHarness, inbox: InBox) -> None:
    box = inbox.box
    control = planes.mint(box.lease_id, box.epoch + 1, mode="control")
    url = f"ws://127.0.0.1:{inbox.desktop}/"
    async with websockets.connect(url, subprotocols=["binary", control]) as ws:  # type: ignore[list-item]
        assert await asyncio.wait_for(ws.recv(), 5) == b"RFB 003.008\n"  # positive control: it serves
    # The box is now brought up as the activities bring up local boxes: the old edge must go.
    out = await _up(planes, box, "desktop-up", box.epoch + 1, SANDBOX_EDGE_EXTERNAL="1", SANDBOX_EDGE_KEY_STDIN="0")
    up = parse_desktop_up(out)
    assert up is not None and up.port == 0
    with pytest.raises(OSError):
        async with websockets.connect(url, subprotocols=["binary", control], open_timeout=3):  # type: ignore[list-item]
            pass
    assert not (box.state_dir / "desktop" / "port").exists()
