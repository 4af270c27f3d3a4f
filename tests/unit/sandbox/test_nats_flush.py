"""flush_in_order against a minimal NATS server that records the order of what it reads.

The recording server answers each PING the moment it reads it, as nats-server may when a SUB
arrives in a later TCP read. nats-py's own ``flush()`` writes its PING ahead of a SUB still in
the client's pending buffer (the positive control shows it); ``flush_in_order`` returns only
after the server has read the SUB.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from sandbox.nats_flush import flush_in_order

INFO = b'INFO {"server_id":"rec","version":"2.10.0","proto":1,"max_payload":1048576,"headers":true}\r\n'


class RecordingServer:
    """Speaks just enough NATS for connect, SUB and PING; ``seen`` is every verb in arrival order."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(INFO)
        await writer.drain()
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].strip().decode()
            self.seen.append(verb)
            if verb == "PING":
                writer.write(b"PONG\r\n")
                await writer.drain()
        writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"


@pytest.fixture
async def recording() -> AsyncIterator[tuple[RecordingServer, str]]:
    server = RecordingServer()
    url = await server.start()
    yield server, url
    assert server.server is not None
    server.server.close()


async def _subscribed_then(flush: str, server: RecordingServer, url: str) -> list[str]:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        await nc.flush()  # the connect handshake's own PINGs are behind us
        server.seen.clear()

        async def ignore(msg: object) -> None:
            return None

        await nc.subscribe("agent.ws.a.rpc", cb=ignore)
        if flush == "plain":
            await nc.flush()
        else:
            await flush_in_order(nc)
        return list(server.seen)
    finally:
        await nc.close()


async def test_plain_flush_pings_ahead_of_a_pending_sub(recording: tuple[RecordingServer, str]) -> None:
    """Positive control: the library's flush is answered before the server has read the SUB."""
    server, url = recording
    seen = await _subscribed_then("plain", server, url)
    assert seen[0] == "PING"
    assert "SUB" not in seen[: seen.index("PING") + 1]


async def test_flush_in_order_returns_after_the_server_read_the_sub(recording: tuple[RecordingServer, str]) -> None:
    server, url = recording
    for _ in range(20):
        seen = await _subscribed_then("in-order", server, url)
        assert "SUB" in seen
        assert "PING" in seen[seen.index("SUB") :]  # a PING answered after the SUB was read
