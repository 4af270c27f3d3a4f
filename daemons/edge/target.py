"""Connecting to a plane's unix socket without following anything the box may have planted.

A local box's edge runs on the host and its target sockets live in a directory the box owns (its
``/tmp``), so the box can replace any part of that path with a symbolic link, to another box's
VNC server or to a socket of the host. The path is therefore walked one component at a time from
``/``: each directory is opened with ``O_PATH | O_DIRECTORY | O_NOFOLLOW`` relative to the previous
one, the last component with ``O_PATH | O_NOFOLLOW``, and it must be a socket (``S_ISSOCK``);
the connection then goes to ``/proc/self/fd/<fd>``, which names exactly the inode that was
checked. A symbolic link anywhere on the way fails the walk (``ENOTDIR`` or ``ENOTSOCK``).

Callers pass a path without symbolic links of its own (the host side resolves the trusted part,
the box's directory, before starting the edge; the in-box scripts pass ``pwd -P``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from pathlib import Path

__all__ = ["connect_unix_target", "open_socket_path", "open_unix_target"]

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_socket_path(path: str | Path) -> int:
    """An ``O_PATH`` descriptor of the unix socket at the absolute ``path``, reached without following links.

    The caller closes it.

    Raises:
        OSError: A component is missing (``ENOENT``), a directory on the way is not one or is a
            symbolic link (``ENOTDIR``), the path is relative or has ``.``/``..`` parts
            (``EINVAL``), or the last component is not a socket (``ENOTSOCK``, also for a link).
    """
    text = os.fspath(path)
    parts = text.split("/")
    if not text.startswith("/") or any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, "the target socket must be an absolute path without . or ..", text)
    names = [p for p in parts if p]
    if not names:
        raise OSError(errno.ENOTSOCK, "the target is not a socket", text)
    dir_fd = os.open("/", _DIR_FLAGS)
    try:
        for name in names[:-1]:
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = os.open(names[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTSOCK, "the target is not a socket", text)
    except BaseException:
        os.close(fd)
        raise
    return fd


def connect_unix_target(path: str | Path, *, timeout: float | None = 10.0) -> socket.socket:
    """A blocking stream socket connected to the unix socket at ``path`` (see :func:`open_socket_path`).

    Raises:
        OSError: The path is unsafe or not a socket, or nothing accepts connections on it.
    """
    fd = open_socket_path(path)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(f"/proc/self/fd/{fd}")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(fd)
    return sock


async def open_unix_target(path: str | Path) -> socket.socket:
    """A non-blocking stream socket connected to the unix socket at ``path``, for asyncio.

    Raises:
        OSError: As :func:`connect_unix_target`.
    """
    loop = asyncio.get_running_loop()
    fd = open_socket_path(path)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, f"/proc/self/fd/{fd}")
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(fd)
    return sock
