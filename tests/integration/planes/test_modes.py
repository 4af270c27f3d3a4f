"""View and control tokens against real planes: a view token sees but cannot type or point; control can.

Also what a local box can reach of its edge: not the key (it stays in the box's private
directory on the host), and not the control server through a link planted for the view one.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import websockets

from sandbox.stream_token import derive_lease_key
from tests.integration.planes.harness import X_ENV, Box, PlaneHarness, Rfb, pointer_at

pytestmark = pytest.mark.timeout(90)

_KEYSYM_X: int = 0x78
_KEYSYM_Q: int = 0x71


@dataclass
class Up:
    box: Box
    desktop_port: int
    terminal_port: int


@pytest.fixture(scope="module")
async def up(planes: PlaneHarness) -> AsyncIterator[Up]:
    box = await planes.box()
    desktop, terminal = await asyncio.gather(
        planes.activities.ensure_display_stack(box.desktop_request(geometry="800x600")),
        planes.activities.ensure_terminal_server(box.terminal_request()),
    )
    assert terminal.available and terminal.port is not None
    yield Up(box, desktop.port, terminal.port)


def _desktop(planes: PlaneHarness, up: Up, mode: str) -> Any:
    token = planes.mint(up.box.lease_id, up.box.epoch, mode=mode)
    return websockets.connect(f"ws://127.0.0.1:{up.desktop_port}/", subprotocols=["binary", token])  # type: ignore[list-item]


async def test_a_view_token_cannot_move_the_pointer_and_a_control_token_can(planes: PlaneHarness, up: Up) -> None:
    box = up.box
    assert (await box.sh(X_ENV + "xdotool mousemove 10 10"))[0] == 0
    assert await pointer_at(box) == (10, 10)

    async with _desktop(planes, up, "view") as ws:
        rfb = Rfb(ws)
        assert await rfb.handshake() == (800, 600)  # the view sees the desktop...
        for _ in range(5):
            await rfb.pointer(321, 234)
            await rfb.pointer(321, 234, buttons=1)
            await rfb.pointer(321, 234)
        await asyncio.sleep(0.7)
        assert await pointer_at(box) == (10, 10)  # ...but its pointer events go nowhere

    # Positive control: the same events through a control token move the pointer.
    async with _desktop(planes, up, "control") as ws:
        rfb = Rfb(ws)
        await rfb.handshake()
        await rfb.pointer(321, 234)
        deadline = time.monotonic() + 5
        while await pointer_at(box) != (321, 234) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await pointer_at(box) == (321, 234)


_LOOKUP = re.compile(r"XLookupString gives \d+ bytes: \(([0-9a-f ]*)\)")


def _typed(xev_log: str) -> str:
    text = ""
    for event in xev_log.split("KeyPress event")[1:]:
        m = _LOOKUP.search(event.split("KeyRelease event")[0])
        if m and m[1].strip():
            text += bytes.fromhex(m[1]).decode("utf-8", "replace")
    return text


async def test_a_view_token_cannot_type_and_a_control_token_can(planes: PlaneHarness, up: Up) -> None:
    box = up.box
    log = f"/tmp/xev-{secrets.token_hex(3)}.log"
    code, out = await box.sh(
        X_ENV + f"setsid stdbuf -oL xev -geometry 300x200+0+0 -event keyboard </dev/null >{log} 2>&1 & "
        'for i in $(seq 100); do xdotool search --onlyvisible --name "Event Tester" >/dev/null && exit 0; '
        "sleep 0.05; done; exit 1"
    )
    assert code == 0, out
    # The window has the keyboard while the pointer is over it (no window manager: PointerRoot).
    assert (await box.sh(X_ENV + "xdotool mousemove 100 100"))[0] == 0

    async def typed() -> str:
        code, out = await box.sh(f"cat {log}")
        assert code == 0, out
        return _typed(out)

    async with _desktop(planes, up, "view") as ws:
        rfb = Rfb(ws)
        await rfb.handshake()
        for _ in range(3):
            await rfb.key(_KEYSYM_X)
        await asyncio.sleep(0.7)
    assert await typed() == ""

    async with _desktop(planes, up, "control") as ws:
        rfb = Rfb(ws)
        await rfb.handshake()
        await rfb.key(_KEYSYM_Q)
        deadline = time.monotonic() + 5
        while await typed() != "q" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert await typed() == "q"


async def _terminal(planes: PlaneHarness, up: Up, mode: str, line: bytes) -> bytes:
    """Open the terminal with a ``mode`` token, type ``line``, and return the output seen meanwhile."""
    token = planes.mint(up.box.lease_id, up.box.epoch, plane="terminal", mode=mode)
    url = f"ws://127.0.0.1:{up.terminal_port}/"
    output = b""
    async with websockets.connect(url, subprotocols=["tty", token]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"AuthToken": "", "columns": 80, "rows": 24}).encode())

        async def read_for(seconds: float) -> None:
            nonlocal output
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    frame = await asyncio.wait_for(ws.recv(), max(0.05, deadline - time.monotonic()))
                except TimeoutError:
                    return
                data = frame.encode() if isinstance(frame, str) else frame
                if data[:1] == b"0":
                    output += data[1:]

        await read_for(1.0)  # the shell's prompt
        await ws.send(b"0" + line)
        await read_for(1.5)
    return output


async def test_a_view_token_keystrokes_never_reach_the_shell(planes: PlaneHarness, up: Up) -> None:
    box = up.box
    view_mark, control_mark = f"/tmp/view-{secrets.token_hex(3)}", f"/tmp/control-{secrets.token_hex(3)}"
    seen = await _terminal(planes, up, "view", f"touch {view_mark}\r".encode())
    assert seen.strip(), "a view token still shows the terminal"
    assert view_mark.encode() not in seen  # not even echoed
    assert (await box.sh(f"test -e {view_mark}"))[0] != 0

    # Positive control: the same keystrokes with a control token run in the box.
    seen = await _terminal(planes, up, "control", f"touch {control_mark}\r".encode())
    assert control_mark.encode() in seen
    deadline = time.monotonic() + 5
    while (await box.sh(f"test -e {control_mark}"))[0] != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (await box.sh(f"test -e {control_mark}"))[0] == 0


async def test_the_edge_key_is_not_readable_from_inside_the_box(planes: PlaneHarness, up: Up) -> None:
    box = up.box
    key_hex = derive_lease_key(planes.root, box.lease_id, box.epoch).hex()
    # Positive control: the host (the edge) reads it from the box's private directory.
    assert (box.private_dir / "key").read_text().strip() == key_hex
    plausible = [
        "/tmp/.sandbox-edge/key",
        '"${TMPDIR:-/tmp}/.sandbox-edge/key"',
        '"${SANDBOX_EDGE_DIR:-/tmp/.sandbox-edge}/key"',
        "/tmp/.sandbox-edge/desktop/key",
        "/tmp/.sandbox-edge/terminal/key",
        '"$HOME/.sandbox-edge/key"',
        "/workspace/.sandbox-edge/key",
        "/opt/sandbox/key",
        str(box.private_dir / "key"),
        str(box.private_dir / "desktop.log"),
        str(box.session.path / "edge" / "key"),
        str(box.layout.edge.box_tmp / ".sandbox-edge" / "key"),
    ]
    script = "; ".join(f"cat {path} 2>/dev/null" for path in plausible)
    # Everything the box can write, and what its processes were started with.
    script += '; grep -rhaI . /tmp /workspace "$HOME" 2>/dev/null; cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ'
    code, out = await box.sh(script + " 2>/dev/null; true")
    assert code == 0
    assert key_hex not in out
    # The box's own part of the desktop state is readable to it, all the same.
    code, out = await box.sh("cat /tmp/.sandbox-edge/desktop/display")
    assert code == 0 and out.strip().isdigit()


async def test_a_link_planted_for_the_view_socket_does_not_reach_the_control_server(
    planes: PlaneHarness, up: Up
) -> None:
    box = await planes.box()
    desktop = await planes.activities.ensure_display_stack(box.desktop_request())
    url = f"ws://127.0.0.1:{desktop.port}/"
    view = planes.mint(box.lease_id, box.epoch, mode="view")
    control = planes.mint(box.lease_id, box.epoch, mode="control")
    # The box swaps its view-only socket for a link to the full server.
    code, out = await box.sh("cd /tmp/.sandbox-edge/desktop && ln -sfn vnc.sock vnc-view.sock && ls -l vnc-view.sock")
    assert code == 0 and "->" in out, out
    async with websockets.connect(url, subprotocols=["binary", view]) as ws:  # type: ignore[list-item]
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)  # closed before any RFB byte
    assert "VNC server is not answering" in box.edge_log("desktop").read_text()
    # Positive control: the control socket itself is fine and reached by a control token.
    async with websockets.connect(url, subprotocols=["binary", control]) as ws:  # type: ignore[list-item]
        assert await asyncio.wait_for(ws.recv(), 5) == b"RFB 003.008\n"
