"""The desktop edge: websockify in front of x11vnc's unix sockets, with our stream-token check.

:class:`StreamTokenAuth` checks an upgrade request's headers before websockify answers it, so a
refused viewer gets ``403`` and websockify never opens a VNC socket. An admitted viewer is routed
by its token's mode: ``control`` to the full x11vnc (``--unix-target``), ``view`` to the one
started with ``-viewonly`` (``--view-target``), which ignores pointer, keyboard and clipboard
input. websockify forks a process per connection, and the request handler
(:func:`_handler_class`) chooses the target in that process from the claims it admitted; it
reaches the socket without following symbolic links (:mod:`daemons.edge.target`), since a local
box's edge runs on the host and the box owns the socket directory.

Clients must offer ``binary`` *first* and the token second (noVNC: ``wsProtocols: ['binary',
token]``): websockify splits the header on ``,`` without trimming and only selects an exact
``binary``.

:func:`serve_desktop_edge` is what ``python -m daemons.edge desktop`` runs: it binds the port first
(see :mod:`daemons.edge.listener`), then hands the socket to websockify. Nothing it logs carries a
token (anything shaped like one is masked) or the key.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import warnings
from email.message import Message
from pathlib import Path
from typing import Any, Final, NoReturn

from daemons.edge.admission import DESKTOP_TOKEN_PORT, Admission, EdgeGate, EdgeKey
from daemons.edge.listener import bind_listener, publish_port
from daemons.edge.target import connect_unix_target
from sandbox.stream_token import StreamMode

__all__ = ["StreamTokenAuth", "serve_desktop_edge"]

log = logging.getLogger("daemons.edge.desktop")

_TOKEN_LIKE: Final = re.compile(r"ogs_[A-Za-z0-9_\-.=%]*")


def _auth_error(reason: str) -> Exception:
    from websockify.auth_plugins import AuthenticationError  # type: ignore[import-untyped]

    error: Exception = AuthenticationError(
        log_msg=f"stream token refused: {reason}", response_code=403, response_msg="Forbidden"
    )
    return error


class StreamTokenAuth:
    """websockify auth plugin: admit an upgrade only with a valid desktop stream token as a subprotocol.

    Args:
        src: The key file.
        epoch: The lease epoch this edge serves.
    """

    def __init__(self, src: str | None = None, *, epoch: int, plane_port: int = DESKTOP_TOKEN_PORT) -> None:
        if not src:
            raise ValueError("StreamTokenAuth needs a key file")
        self._gate = EdgeGate(EdgeKey(Path(src)), plane_port, epoch=epoch)

    def verdict(self, headers: Message) -> Admission:
        """The admission of a request with these headers (never raises on their content)."""
        values = headers.get_all("Sec-WebSocket-Protocol") or []
        return self._gate.admit(str(v) for v in values)

    def admit(self, headers: Message) -> Admission:
        """The admission of a request with these headers; raises ``AuthenticationError`` (403) when refused."""
        verdict = self.verdict(headers)
        if not verdict.admitted:
            raise _auth_error(verdict.reason)
        return verdict

    def authenticate(self, headers: Message, target_host: object = None, target_port: object = None) -> None:
        """websockify's plugin hook: raise ``AuthenticationError`` (403) unless the request offers a valid token."""
        self.admit(headers)


def _import_websockify() -> Any:
    # numpy only speeds up unmasking client frames (small input events here) and costs ~0.4 s of
    # start-up; websockify falls back to pure Python without it.
    sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from websockify import websocketproxy  # type: ignore[import-untyped]

    return websocketproxy


def _handler_class(websocketproxy: Any, targets: dict[StreamMode, Path]) -> Any:
    """websockify's proxy handler, routing each admitted connection by its token's mode."""

    class StreamProxyRequestHandler(websocketproxy.ProxyRequestHandler):  # type: ignore[misc]
        _stream_mode: StreamMode | None = None

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            # websockify logs request lines and paths; a token offered in a URL must not reach the log.
            super().log_message("%s", _TOKEN_LIKE.sub("ogs_<masked>", format % args))

        def auth_connection(self) -> None:
            auth: StreamTokenAuth = self.server.auth_plugin
            verdict = auth.verdict(self.headers)
            if not verdict.admitted:
                log.info("refused %s: %s", self.client_address[0], verdict.reason)
                error = _auth_error(verdict.reason)
                self.send_auth_error(error)
                raise error
            self._stream_mode = verdict.mode
            # The path is never used (the token travels in-band); do not let websockify log it.
            self.path = "/"

        def new_websocket_client(self) -> None:
            mode = self._stream_mode
            if mode is None:  # pragma: no cover - auth_connection runs first on every upgrade
                raise self.CClose(1008, "not admitted")
            log.info("admitted %s (%s)", self.client_address[0], mode)
            try:
                target = connect_unix_target(targets[mode])
            except OSError as err:
                log.warning("the %s VNC server is not answering on its socket: %s", mode, err.strerror or err)
                raise self.CClose(1011, "Failed to connect to downstream server") from None
            try:
                self.do_proxy(target)
            finally:
                with contextlib.suppress(OSError):
                    target.shutdown(socket.SHUT_RDWR)
                target.close()

    return StreamProxyRequestHandler


def serve_desktop_edge(
    *,
    port: int,
    any_port: bool,
    port_file: Path,
    unix_target: Path,
    view_target: Path,
    key_file: Path,
    epoch: int,
    host: str = "127.0.0.1",
) -> NoReturn:
    """Run websockify on ``host:port`` (or any free port) in front of x11vnc; never returns.

    ``control`` tokens reach ``unix_target``, ``view`` tokens the view-only ``view_target``;
    tokens of another ``epoch`` are refused.

    Raises:
        OSError: The port cannot be bound.
    """
    auth = StreamTokenAuth(str(key_file), epoch=epoch)
    sock = bind_listener(host, port, any_port=any_port)
    actual = int(sock.getsockname()[1])
    websocketproxy = _import_websockify()
    server = websocketproxy.WebSocketProxy(
        _handler_class(websocketproxy, {"control": unix_target, "view": view_target}),
        listen_fd=sock.fileno(),
        listen_host=host,
        listen_port=actual,
        unix_target=str(unix_target),
        auth_plugin=auth,
        web="",
        verbose=False,
    )
    publish_port(port_file, actual)
    log.info("desktop edge listening on %s:%d", host, actual)
    server.start_server()
    sys.exit(0)
