"""The edge refuses every bad token before any VNC or PTY byte flows, and tokens never reach a URL or a log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from sandbox.stream_token import STREAM_TOKEN_PREFIX
from tests.integration.planes.harness import Box, PlaneHarness, box_files

pytestmark = pytest.mark.timeout(60)

_PROTOCOL = {"desktop": "binary", "terminal": "tty"}


@dataclass
class Planes:
    """A box with both planes up, and a second box of another lease."""

    box: Box
    other: Box
    desktop_port: int
    terminal_port: int

    def port(self, plane: str) -> int:
        return self.desktop_port if plane == "desktop" else self.terminal_port


@pytest.fixture(scope="module")
async def up(planes: PlaneHarness) -> AsyncIterator[Planes]:
    box, other = await planes.box(epoch=3), await planes.box(epoch=3)
    desktop, terminal = await asyncio.gather(
        planes.activities.ensure_display_stack(box.desktop_request()),
        planes.activities.ensure_terminal_server(box.terminal_request()),
    )
    assert terminal.available and terminal.port is not None
    yield Planes(box, other, desktop.port, terminal.port)


async def _refused(url: str, protocols: list[str]) -> int:
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(url, subprotocols=protocols, open_timeout=5):  # type: ignore[arg-type]
            pass
    return caught.value.response.status_code


def _bad_tokens(planes: PlaneHarness, up: Planes, plane: str) -> dict[str, list[str]]:
    box = up.box
    good = planes.mint(box.lease_id, box.epoch, plane=plane)
    payload, signature = good.rsplit(".", 1)
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    other_plane = "terminal" if plane == "desktop" else "desktop"
    proto = _PROTOCOL[plane]
    return {
        "no token": [proto],
        "expired token": [proto, planes.mint(box.lease_id, box.epoch, plane=plane, now=int(time.time()) - 600)],
        "token of another lease": [proto, planes.mint(up.other.lease_id, up.other.epoch, plane=plane)],
        "token of an older epoch": [proto, planes.mint(box.lease_id, box.epoch - 1, plane=plane)],
        "token of a newer epoch": [proto, planes.mint(box.lease_id, box.epoch + 1, plane=plane)],
        "tampered signature": [proto, f"{payload}.{flipped}"],
        "token under another root secret": [proto, planes.mint(box.lease_id, box.epoch, plane=plane, root=b"x")],
        "token of the other plane": [proto, planes.mint(box.lease_id, box.epoch, plane=other_plane)],
        "not a token": [proto, "ogs_garbage"],
    }


@pytest.mark.parametrize("plane", ["desktop", "terminal"])
async def test_bad_tokens_are_refused_before_the_upgrade(planes: PlaneHarness, up: Planes, plane: str) -> None:
    url = f"ws://127.0.0.1:{up.port(plane)}/"
    log = up.box.edge_log(plane)
    before = log.read_text()
    for case, protocols in _bad_tokens(planes, up, plane).items():
        assert await _refused(url, protocols) == 403, case
    # The edge never opened the plane's socket for any of them.
    after = log.read_text()[len(before) :]
    assert "connecting to unix socket" not in after and "admitted" not in after
    assert after.count("refused") >= len(_bad_tokens(planes, up, plane)), after


@pytest.mark.parametrize("plane", ["desktop", "terminal"])
async def test_a_token_in_the_url_is_ignored(planes: PlaneHarness, up: Planes, plane: str) -> None:
    token = planes.mint(up.box.lease_id, up.box.epoch, plane=plane)
    url = f"ws://127.0.0.1:{up.port(plane)}/?token={token}"
    assert await _refused(url, [_PROTOCOL[plane]]) == 403


async def test_a_valid_desktop_token_reaches_vnc(planes: PlaneHarness, up: Planes) -> None:
    token = planes.mint(up.box.lease_id, up.box.epoch)
    async with websockets.connect(f"ws://127.0.0.1:{up.desktop_port}/", subprotocols=["binary", token]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "binary"
        assert await asyncio.wait_for(ws.recv(), 5) == b"RFB 003.008\n"


async def test_a_new_epoch_retires_old_tokens_on_the_same_url(planes: PlaneHarness) -> None:
    box = await planes.box(epoch=1)
    first = await planes.activities.ensure_display_stack(box.desktop_request())
    old = planes.mint(box.lease_id, 1)
    url = f"ws://127.0.0.1:{first.port}/"
    async with websockets.connect(url, subprotocols=["binary", old]) as ws:  # type: ignore[list-item]
        assert await asyncio.wait_for(ws.recv(), 5) == b"RFB 003.008\n"
    # The same box ensured under epoch 2 gets the new key and an edge of epoch 2, on the same port.
    second = await planes.activities.ensure_display_stack(box.desktop_request(epoch=2))
    assert not second.already_up and second.port == first.port and second.display == first.display
    assert await _refused(url, ["binary", old]) == 403
    new = planes.mint(box.lease_id, 2)
    async with websockets.connect(url, subprotocols=["binary", new]) as ws:  # type: ignore[list-item]
        assert await asyncio.wait_for(ws.recv(), 5) == b"RFB 003.008\n"


async def test_tokens_never_appear_in_any_log(
    planes: PlaneHarness, up: Planes, caplog: pytest.LogCaptureFixture
) -> None:
    # Run refused and admitted connections on both planes, then grep every file the box wrote
    # and everything this process logged.
    tokens: list[str] = []
    for plane in ("desktop", "terminal"):
        for protocols in _bad_tokens(planes, up, plane).values():
            tokens += [p for p in protocols if p.startswith(STREAM_TOKEN_PREFIX) and len(p) > 20]
            await _refused(f"ws://127.0.0.1:{up.port(plane)}/", protocols)
        good = planes.mint(up.box.lease_id, up.box.epoch, plane=plane)
        tokens.append(good)
        async with websockets.connect(
            f"ws://127.0.0.1:{up.port(plane)}/",
            subprotocols=[_PROTOCOL[plane], good],  # type: ignore[list-item]
        ) as ws:
            if plane == "desktop":
                await asyncio.wait_for(ws.recv(), 5)
    await planes.activities.ensure_display_stack(up.box.desktop_request())
    await asyncio.sleep(0.2)
    key_hex = (up.box.private_dir / "key").read_text().strip()
    files = box_files(up.box)
    assert any(p.name.endswith(".log") for p in files)
    assert up.box.edge_log("desktop") in files and up.box.edge_log("terminal") in files
    for path in files:
        data = path.read_bytes()
        for token in tokens:
            # Signatures are the secret part; payloads are mere claims.
            assert token.encode() not in data and token.rsplit(".", 1)[1].encode() not in data, path
        if path.name != "key":
            assert key_hex.encode() not in data, path
    for record in caplog.records:
        message = record.getMessage()
        assert not any(token in message for token in tokens)
        assert key_hex not in message
