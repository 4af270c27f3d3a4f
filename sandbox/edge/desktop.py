"""The desktop edge: websockify in front of x11vnc's unix socket, with our stream-token auth plugin.

:class:`StreamTokenAuth` is a websockify auth plugin (``--auth-plugin
sandbox.edge.desktop.StreamTokenAuth --auth-source <key file>`` works with websockify's own command
line too). websockify calls it with the request headers before it answers the upgrade, so a
refused viewer gets ``403`` and websockify never opens the VNC socket.

Clients must offer ``binary`` *first* and the token second (noVNC: ``wsProtocols: ['binary',
token]``): websockify splits the header on ``,`` without trimming and only selects an exact
``binary``.

:func:`serve_desktop_edge` is what ``desktop-up`` runs: it binds the port first (see
:mod:`sandbox.edge.listener`), then hands the socket to websockify.
"""

from __future__ import annotations

import logging
import sys
import warnings
from email.message import Message
from pathlib import Path
from typing import Any, NoReturn

from sandbox.edge.admission import DESKTOP_TOKEN_PORT, EdgeGate, EdgeKey
from sandbox.edge.listener import bind_listener, publish_port

__all__ = ["StreamTokenAuth", "serve_desktop_edge"]

log = logging.getLogger("sandbox.edge.desktop")


def _auth_error(reason: str) -> Exception:
    from websockify.auth_plugins import AuthenticationError  # type: ignore[import-untyped]

    error: Exception = AuthenticationError(
        log_msg=f"stream token refused: {reason}", response_code=403, response_msg="Forbidden"
    )
    return error


class StreamTokenAuth:
    """websockify auth plugin: admit an upgrade only with a valid desktop stream token as a subprotocol.

    Args:
        src: The key file (websockify's ``--auth-source``).
    """

    def __init__(self, src: str | None = None, *, plane_port: int = DESKTOP_TOKEN_PORT) -> None:
        if not src:
            raise ValueError("StreamTokenAuth needs --auth-source <key file>")
        self._gate = EdgeGate(EdgeKey(Path(src)), plane_port)

    def authenticate(self, headers: Message, target_host: object = None, target_port: object = None) -> None:
        """Raise websockify's ``AuthenticationError`` (403) unless the request offers a valid token."""
        values = headers.get_all("Sec-WebSocket-Protocol") or []
        verdict = self._gate.admit(str(v) for v in values)
        if not verdict.admitted:
            raise _auth_error(verdict.reason)


def _import_websockify() -> Any:
    # numpy only speeds up unmasking client frames (small input events here) and costs ~0.4 s of
    # start-up; websockify falls back to pure Python without it.
    sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from websockify import websocketproxy  # type: ignore[import-untyped]

    return websocketproxy


def serve_desktop_edge(
    *, port: int, any_port: bool, port_file: Path, unix_target: Path, key_file: Path, host: str = "127.0.0.1"
) -> NoReturn:
    """Run websockify on ``host:port`` (or any free port) proxying to ``unix_target``; never returns.

    Raises:
        OSError: The port cannot be bound.
    """
    sock = bind_listener(host, port, any_port=any_port)
    actual = int(sock.getsockname()[1])
    websocketproxy = _import_websockify()
    server = websocketproxy.WebSocketProxy(
        listen_fd=sock.fileno(),
        listen_host=host,
        listen_port=actual,
        unix_target=str(unix_target),
        auth_plugin=StreamTokenAuth(str(key_file)),
        web="",
        verbose=False,
    )
    publish_port(port_file, actual)
    log.info("desktop edge listening on %s:%d", host, actual)
    server.start_server()
    sys.exit(0)
