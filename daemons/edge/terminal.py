"""The terminal edge: a token-checking front for ttyd, which listens on a unix socket in the box.

The edge reads the viewer's HTTP upgrade request, admits it only when an offered subprotocol is a
valid terminal stream token of the edge's epoch (:class:`~daemons.edge.admission.EdgeGate`), and
otherwise answers ``403`` and closes: nothing reaches ttyd. An admitted request is forwarded, by
the token's mode, to the writable ttyd (``control``) or to the one started without
``--writable`` (``view``, which drops every keystroke), with the token removed from
``Sec-WebSocket-Protocol`` and the path set to ttyd's ``/ws``; from then on the edge copies bytes
both ways, so the WebSocket session itself is ttyd's, end to end. The socket is reached without
following symbolic links (:mod:`daemons.edge.target`): a local box's edge runs on the host and the
box owns the socket directory.

Viewers offer ``tty`` (ttyd's subprotocol) and the token: ``Sec-WebSocket-Protocol: tty, ogs_...``.
Any request path is accepted; the token is never read from the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from daemons.edge.admission import TERMINAL_TOKEN_PORT, EdgeGate, EdgeKey
from daemons.edge.listener import bind_listener, publish_port
from daemons.edge.target import open_unix_target
from sandbox.stream_token import StreamMode

__all__ = ["TTYD_SUBPROTOCOL", "TerminalEdge", "serve_terminal_edge"]

log = logging.getLogger("daemons.edge.terminal")

TTYD_SUBPROTOCOL: Final = "tty"
_HEAD_LIMIT: Final = 16384
_COPY_CHUNK: Final = 65536


@dataclass(frozen=True)
class _Request:
    method: str
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [v for k, v in self.headers if k.lower() == lowered]


def _parse_head(head: bytes) -> _Request | None:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" or ":" not in line:  # obsolete folding or garbage
            return None
        name, _, value = line.partition(":")
        if not name or name != name.strip():
            return None
        headers.append((name, value.strip()))
    return _Request(parts[0], headers)


def _response(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode("ascii")


class TerminalEdge:
    """Admits terminal viewers by stream token and splices them to ttyd's unix socket.

    Args:
        gate: The token check (terminal plane).
        unix_target: The writable ttyd's socket (``control`` tokens).
        view_target: The read-only ttyd's socket (``view`` tokens).
        upstream_path: ttyd's WebSocket path.
        handshake_timeout: How long a client may take to send its request head.
    """

    def __init__(
        self,
        gate: EdgeGate,
        unix_target: Path,
        view_target: Path,
        *,
        upstream_path: str = "/ws",
        handshake_timeout: float = 10.0,
    ) -> None:
        self._gate = gate
        self._targets: dict[StreamMode, Path] = {"control": unix_target, "view": view_target}
        self._path = upstream_path
        self._timeout = handshake_timeout

    async def serve(self, sock: socket.socket) -> None:
        """Serve connections arriving on the listening ``sock`` until cancelled."""
        server = await asyncio.start_server(self.handle, sock=sock, limit=_HEAD_LIMIT)
        async with server:
            await server.serve_forever()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one viewer connection: check its upgrade request, then proxy or refuse."""
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "client"
        try:
            upstream = await self._admit(reader, writer, where)
            if upstream is None:
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(self._copy(reader, up_writer), self._copy(up_reader, writer))
            finally:
                up_writer.close()
                with contextlib.suppress(OSError):
                    await up_writer.wait_closed()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _admit(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            log.info("refused %s: no complete request head", where)
            writer.write(_response("400 Bad Request"))
            return None
        request = _parse_head(head[:-4])
        if request is None:
            log.info("refused %s: malformed request", where)
            writer.write(_response("400 Bad Request"))
            return None
        upgrade = ",".join(request.values("Upgrade")).lower()
        if request.method != "GET" or "websocket" not in upgrade:
            log.info("refused %s: not a websocket upgrade", where)
            writer.write(_response("403 Forbidden"))
            return None
        verdict = self._gate.admit(request.values("Sec-WebSocket-Protocol"))
        if not verdict.admitted:
            log.info("refused %s: %s", where, verdict.reason)
            writer.write(_response("403 Forbidden"))
            return None
        if TTYD_SUBPROTOCOL not in verdict.protocols:
            log.info("refused %s: the %r subprotocol was not offered", where, TTYD_SUBPROTOCOL)
            writer.write(_response("400 Bad Request"))
            return None
        mode = verdict.mode or "view"
        try:
            sock = await open_unix_target(self._targets[mode])
            up_reader, up_writer = await asyncio.open_unix_connection(sock=sock, limit=_COPY_CHUNK)
        except OSError as err:
            log.warning("admitted %s (%s) but ttyd is not answering on its socket: %s", where, mode, err.strerror)
            writer.write(_response("502 Bad Gateway"))
            return None
        lines = [f"GET {self._path} HTTP/1.1"]
        for name, value in request.headers:
            if name.lower() != "sec-websocket-protocol":
                lines.append(f"{name}: {value}")
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(verdict.protocols)}")
        up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        log.info("admitted %s (%s)", where, mode)
        return up_reader, up_writer

    @staticmethod
    async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(_COPY_CHUNK):
                dst.write(chunk)
                await dst.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()
                else:
                    dst.close()


async def _serve(edge: TerminalEdge, sock: socket.socket) -> None:
    await edge.serve(sock)


def serve_terminal_edge(
    *,
    port: int,
    any_port: bool,
    port_file: Path,
    unix_target: Path,
    view_target: Path,
    key_file: Path,
    epoch: int,
    host: str = "127.0.0.1",
) -> None:
    """Run the terminal edge on ``host:port`` (or any free port) in front of ttyd's sockets.

    ``control`` tokens reach ``unix_target`` (the writable ttyd), ``view`` tokens ``view_target``;
    tokens of another ``epoch`` are refused.

    Raises:
        OSError: The port cannot be bound.
    """
    gate = EdgeGate(EdgeKey(key_file), TERMINAL_TOKEN_PORT, epoch=epoch)
    sock = bind_listener(host, port, any_port=any_port)
    actual = int(sock.getsockname()[1])
    edge = TerminalEdge(gate, unix_target, view_target)
    publish_port(port_file, actual)
    log.info("terminal edge listening on %s:%d", host, actual)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(edge, sock))
