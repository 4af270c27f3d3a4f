"""The edge's listening socket: bound before anything else starts, its port published in a file.

Local boxes' edges run on the host, side by side, so each asks for port 0 (any free port, chosen
atomically by the kernel) or for the port it had before, and whoever started it reads the port
back from the port file. The file appears only once the socket is listening, so its presence
means connections will be accepted (queued until the server loop runs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

__all__ = ["bind_listener", "publish_port"]

_BACKLOG = 64


def bind_listener(host: str, port: int, *, any_port: bool) -> socket.socket:
    """A listening TCP socket on ``host:port``; with ``any_port``, any free port if that one is taken.

    Raises:
        OSError: The port cannot be bound (and ``any_port`` is false, or port 0 failed too).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in (port, 0) if any_port and port != 0 else (port,):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, candidate))
            sock.listen(_BACKLOG)
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE or candidate == 0 or not any_port:
                raise
            continue
        return sock
    raise OSError(errno.EADDRINUSE, f"no free port on {host}")


def publish_port(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically (readers never see a partial number)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(f"{port}\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
