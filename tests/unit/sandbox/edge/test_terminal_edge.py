"""The terminal edge against a fake ttyd on a unix socket: what reaches upstream, and what never does."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox.edge import TERMINAL_TOKEN_PORT, EdgeGate, EdgeKey
from sandbox.edge.terminal import TerminalEdge
from sandbox.stream_token import StreamTokenKey, derive_lease_key

ROOT = b"unit-root"
LEASE = "lease/ws/g"


def _token(port: int = TERMINAL_TOKEN_PORT) -> str:
    key = StreamTokenKey(derive_lease_key(ROOT, LEASE, 1))
    ids = {name: str(uuid.uuid4()) for name in ("workspace_id", "session_id", "viewer_id")}
    return key.mint_for({**ids, "lease_epoch": 1, "port": port})


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


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[int, FakeTtyd]]:
    key_file = tmp_path / "key"
    key_file.write_text(derive_lease_key(ROOT, LEASE, 1).hex())
    sock_path = tmp_path / "ttyd.sock"
    fake = FakeTtyd()
    upstream = await asyncio.start_unix_server(fake.handle, path=str(sock_path))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    terminal = TerminalEdge(EdgeGate(EdgeKey(key_file), TERMINAL_TOKEN_PORT), sock_path)
    task = asyncio.create_task(terminal.serve(listener))
    try:
        yield listener.getsockname()[1], fake
    finally:
        task.cancel()
        upstream.close()


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
    token = _token()
    answer = await _request(port, f"tty, {token}", path="/anything?x=1", extra=b"hello")
    assert answer.startswith(b"HTTP/1.1 101")
    await asyncio.sleep(0.05)
    (head,) = fake.heads
    assert head.startswith(b"GET /ws HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Protocol: tty\r\n" in head
    assert token.encode() not in head


@pytest.mark.parametrize(
    "protocols",
    [None, "tty", "tty, ogs_bad.sig", "tty, {desktop_token}"],
    ids=["none", "no-token", "bad", "desktop"],
)
async def test_refused_requests_get_403_and_never_reach_ttyd(edge: tuple[int, FakeTtyd], protocols: str | None) -> None:
    port, fake = edge
    if protocols is not None:  # minted now, not at collection, so a long suite cannot expire it
        protocols = protocols.format(desktop_token=_token(port=6080))
    answer = await _request(port, protocols, extra=b"0ls\r")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert fake.heads == []


async def test_a_valid_token_without_the_tty_subprotocol_is_a_bad_request(edge: tuple[int, FakeTtyd]) -> None:
    port, fake = edge
    answer = await _request(port, f"binary, {_token()}")
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
