"""The whole chain through the real worker: attach_viewer ensures the plane, the client mints, the edge admits."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from sandbox.errors import InvalidRequest
from tests.conftest import Runtime
from tests.integration.test_lease_workflow import record_history

pytestmark = pytest.mark.timeout(90)


async def test_attach_viewer_gives_a_cell_the_edge_admits(runtime: Runtime) -> None:
    leases = runtime.leases()
    group = f"planes-{uuid.uuid4().hex[:8]}"
    grant = await leases.acquire("ws-planes", group, holder_id="turn-1")
    try:
        cell = await leases.attach_viewer("ws-planes", group, plane="desktop")
        assert cell.token not in cell.url and cell.url.startswith("ws://127.0.0.1:")
        assert cell.epoch == grant.epoch and cell.transport == "vnc-ws"
        assert cell.mode == "view" and _claims(cell.token)["mode"] == "view"  # the default
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


async def test_attach_viewer_in_control_mode_mints_a_control_token(runtime: Runtime) -> None:
    leases = runtime.leases()
    group = f"planes-{uuid.uuid4().hex[:8]}"
    grant = await leases.acquire("ws-planes", group, holder_id="turn-1")
    try:
        cell = await leases.attach_viewer("ws-planes", group, plane="terminal", mode="control")
        assert cell.mode == "control" and cell.epoch == grant.epoch
        claims = _claims(cell.token)
        assert claims["mode"] == "control" and claims["leaseEpoch"] == grant.epoch
        async with websockets.connect(cell.url, subprotocols=["tty", cell.token]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "tty"
        with pytest.raises(InvalidRequest):
            await leases.attach_viewer("ws-planes", group, plane="terminal", mode="admin")  # type: ignore[arg-type]
        await leases.attach_viewer("ws-planes", group, plane="desktop", viewer_id=cell.viewer_id)  # view
    finally:
        await leases.release("ws-planes", group, "turn-1")
    await record_history(runtime, "ws-planes", group, "attach_viewer_modes")


def _claims(token: str) -> dict[str, object]:
    payload = token.removeprefix("ogs_").split(".", 1)[0]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims
