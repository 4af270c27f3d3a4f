"""A terminal through the edge: a WebSocket client types a command and reads its output back."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import websockets

from tests.integration.planes.harness import PlaneHarness

pytestmark = pytest.mark.timeout(60)


async def test_typing_through_the_edge_reads_the_output_back(planes: PlaneHarness) -> None:
    box = await planes.viewer_box()
    terminal = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert terminal.available and terminal.port is not None
    token = planes.mint(box.lease_id, box.epoch, plane="terminal", mode="control")
    url = await box.edge_url(terminal.port)
    async with websockets.connect(url, subprotocols=["tty", token]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "tty"
        await ws.send(json.dumps({"AuthToken": "", "columns": 80, "rows": 24}).encode())
        # Quoted, so that the terminal's echo of the typed line does not itself contain the marker.
        await ws.send(b"0echo mark''er\r")
        output = b""
        deadline = time.monotonic() + 10
        while not re.search(rb"[\r\n]marker\r\n", output):
            frame = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            data = frame.encode() if isinstance(frame, str) else frame
            if data[:1] == b"0":  # ttyd: '0' + terminal output
                output += data[1:]
        # The shell runs inside the box, in its workspace.
        await ws.send(b"0pwd\r")
        while b"/workspace" not in output.rsplit(b"pwd", 1)[-1]:
            frame = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            data = frame.encode() if isinstance(frame, str) else frame
            if data[:1] == b"0":
                output += data[1:]
