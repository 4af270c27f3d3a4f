"""The terminal edge against fake ttyds on unix sockets: what reaches upstream, where, and what never does."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons.edge import TERMINAL_TOKEN_PORT, EdgeGate, EdgeKey
from daemons.edge.terminal import TerminalEdge
from sandbox.stream_token import StreamTokenKey, derive_lease_key

ROOT = b"unit-root"
LEASE = "lease/ws/g"


def _token(port: int = TERMINAL_TOKEN_PORT, *, mode: str = "view", epoch: int = 1) -> str:
    key = StreamTokenKey(derive_lease_key(ROOT, LEASE, 1))
    ids = {name: str(uuid.uuid4()) for name in ("workspace_id", "session_id", "viewer_id")}
    return key.mint_for({**ids, "lease_epoch": epoch, "mode": mode, "port": port})


class FakeTtyd:
    """Records the request heads it receives and answers 101, then echoes."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Protocol: tty\r\n\r\n")
        while data := await reader.read(1024):
            writer.write(data.upper())
            await writer.drain()
        writer.close()


@dataclass
class Edge:
    port: int
    control: FakeTtyd
    view: FakeTtyd
    run: Path


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Edge]:
    """An edge of epoch 1 in front of a control ttyd and a view ttyd (both fakes)."""
    key_file = tmp_path / "key"
    key_file.write_text(derive_lease_key(ROOT, LEASE, 1).hex())
    run = tmp_path / "run"
    run.mkdir()
    control, view = FakeTtyd(), FakeTtyd()
    servers = [
        await asyncio.start_unix_server(control.handle, path=str(run / "ttyd.sock")),
        await asyncio.start_unix_server(view.handle, path=str(run / "ttyd-view.sock")),
    ]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    gate = EdgeGate(EdgeKey(key_file), TERMINAL_TOKEN_PORT, epoch=1)
    terminal = TerminalEdge(gate, run / "ttyd.sock", run / "ttyd-view.sock")
    task = asyncio.create_task(terminal.serve(listener))
    try:
        yield Edge(listener.getsockname()[1], control, view, run)
    finally:
        task.cancel()
        for server in servers:
            server.close()


@pytest.fixture
def edge(both: Edge) -> tuple[int, FakeTtyd]:
    """The edge's port and the fake that control tokens reach."""
    return both.port, both.control


async def _request(port: int, protocols: str | None, *, path: str = "/", extra: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    if protocols is not None:
        head += f"Sec-WebSocket-Protocol: {protocols}\r\n"
    writer.write(head.encode() + b"\r\n" + extra)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def test_an_admitted_request_reaches_ttyd_without_its_token(edge: tuple[int, FakeTtyd]) -> None:
    port, fake = edge
    token = _token(mode="control")
    answer = await _request(port, f"tty, {token}", path="/anything?x=1", extra=b"hello")
    assert answer.startswith(b"HTTP/1.1 101")
    await asyncio.sleep(0.05)
    (head,) = fake.heads
    assert head.startswith(b"GET /ws HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Protocol: tty\r\n" in head
    assert token.encode() not in head


@pytest.mark.parametrize(
    "protocols",
    [None, "tty", "tty, ogs_bad.sig", "tty, {desktop_token}", "tty, {epoch2_token}"],
    ids=["none", "no-token", "bad", "desktop", "other-epoch"],
)
async def test_refused_requests_get_403_and_never_reach_ttyd(both: Edge, protocols: str | None) -> None:
    if protocols is not None:  # minted now, not at collection, so a long suite cannot expire it
        protocols = protocols.format(
            desktop_token=_token(port=6080, mode="control"), epoch2_token=_token(mode="control", epoch=2)
        )
    answer = await _request(both.port, protocols, extra=b"0ls\r")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert both.control.heads == [] and both.view.heads == []


@pytest.mark.parametrize("mode", ["view", "control"])
async def test_the_token_mode_picks_the_ttyd(both: Edge, mode: str) -> None:
    answer = await _request(both.port, f"tty, {_token(mode=mode)}")
    assert answer.startswith(b"HTTP/1.1 101")
    await asyncio.sleep(0.05)
    reached, spared = (both.view, both.control) if mode == "view" else (both.control, both.view)
    assert len(reached.heads) == 1 and spared.heads == []


async def test_a_symlink_planted_for_a_socket_is_not_followed(both: Edge, tmp_path: Path) -> None:
    # The box owns the socket directory: it replaces the view socket with a link to the control one.
    (both.run / "ttyd-view.sock").unlink()
    (both.run / "ttyd-view.sock").symlink_to(both.run / "ttyd.sock")
    answer = await _request(both.port, f"tty, {_token(mode='view')}")
    assert answer.startswith(b"HTTP/1.1 502 ")
    # ...or the whole directory with a link to another directory holding a socket.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (both.run / "ttyd.sock").rename(elsewhere / "ttyd.sock")
    moved = both.run.rename(tmp_path / "moved")
    both.run.symlink_to(elsewhere)
    answer = await _request(both.port, f"tty, {_token(mode='control')}")
    assert answer.startswith(b"HTTP/1.1 502 ")
    await asyncio.sleep(0.05)
    assert both.control.heads == [] and both.view.heads == []
    # Positive control: the real directory back in place, control tokens get through again.
    both.run.unlink()
    moved.rename(both.run)
    (elsewhere / "ttyd.sock").rename(both.run / "ttyd.sock")
    assert (await _request(both.port, f"tty, {_token(mode='control')}")).startswith(b"HTTP/1.1 101")


async def test_a_valid_token_without_the_tty_subprotocol_is_a_bad_request(edge: tuple[int, FakeTtyd]) -> None:
    port, fake = edge
    answer = await _request(port, f"binary, {_token(mode='control')}")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert fake.heads == []


async def test_garbage_is_a_bad_request(edge: tuple[int, FakeTtyd]) -> None:
    port, fake = edge
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x16\x03\x01garbage\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert fake.heads == []
