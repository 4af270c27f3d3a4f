"""The whole chain through the real worker: attach_viewer ensures the plane, the client mints, the edge admits."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.conftest import Runtime

pytestmark = pytest.mark.timeout(90)


async def test_attach_viewer_gives_a_cell_the_edge_admits(runtime: Runtime) -> None:
    leases = runtime.leases()
    group = f"planes-{uuid.uuid4().hex[:8]}"
    grant = await leases.acquire("ws-planes", group, holder_id="turn-1")
    try:
        cell = await leases.attach_viewer("ws-planes", group, plane="desktop")
        assert cell.token not in cell.url and cell.url.startswith("ws://127.0.0.1:")
        assert cell.epoch == grant.epoch and cell.transport == "vnc-ws"
        async with websockets.connect(cell.url, subprotocols=["binary", cell.token]) as ws:  # type: ignore[list-item]
            assert await asyncio.wait_for(ws.recv(), 5) == b"RFB 003.008\n"
        with pytest.raises(InvalidStatus) as caught:
            async with websockets.connect(cell.url, subprotocols=["binary"]):  # type: ignore[list-item]
                pass
        assert caught.value.response.status_code == 403

        terminal = await leases.attach_viewer("ws-planes", group, plane="terminal", viewer_id=cell.viewer_id)
        assert terminal.transport == "pty-ws" and terminal.url != cell.url
        async with websockets.connect(terminal.url, subprotocols=["tty", terminal.token]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "tty"
        # A desktop token does not open the terminal.
        with pytest.raises(InvalidStatus):
            async with websockets.connect(terminal.url, subprotocols=["tty", cell.token]):  # type: ignore[list-item]
                pass
    finally:
        await leases.release("ws-planes", group, "turn-1")
