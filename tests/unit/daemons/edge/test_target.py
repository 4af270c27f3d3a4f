"""Opening a plane's socket in a directory the box owns: no symbolic link is ever followed."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons.edge.target import connect_unix_target, open_socket_path, open_unix_target


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    """A real directory ``run`` with a listening socket ``vnc.sock`` (the path is symlink-free)."""
    run = Path(os.path.realpath(tmp_path)) / "run"
    run.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(run / "vnc.sock"))
    server.listen()
    try:
        yield run / "vnc.sock"
    finally:
        server.close()


def test_a_real_socket_is_reached(listening: Path) -> None:
    # Positive control for every refusal below.
    with connect_unix_target(listening) as sock:
        assert sock.getpeername() == str(listening)


async def test_a_real_socket_is_reached_from_asyncio(listening: Path) -> None:
    sock = await open_unix_target(listening)
    try:
        assert not sock.getblocking()
    finally:
        sock.close()


def test_a_symlink_in_place_of_the_socket_is_refused(listening: Path) -> None:
    link = listening.with_name("vnc-view.sock")
    link.symlink_to(listening)
    with pytest.raises(OSError) as caught:
        connect_unix_target(link)
    assert caught.value.errno == errno.ENOTSOCK


def test_a_symlinked_directory_on_the_way_is_refused(listening: Path) -> None:
    alias = listening.parent.with_name("alias")
    alias.symlink_to(listening.parent)
    with pytest.raises(OSError) as caught:
        connect_unix_target(alias / "vnc.sock")
    assert caught.value.errno == errno.ENOTDIR


def test_something_that_is_not_a_socket_is_refused(listening: Path) -> None:
    plain = listening.with_name("plain")
    plain.write_text("x")
    for path in (plain, listening.parent):
        with pytest.raises(OSError) as caught:
            open_socket_path(path)
        assert caught.value.errno == errno.ENOTSOCK


@pytest.mark.parametrize("path", ["relative/vnc.sock", "/tmp/../tmp/vnc.sock", "/tmp/./vnc.sock"])
def test_relative_or_dotted_paths_are_refused(path: str) -> None:
    with pytest.raises(OSError) as caught:
        open_socket_path(path)
    assert caught.value.errno == errno.EINVAL


def test_a_missing_socket_is_an_ordinary_error(listening: Path) -> None:
    with pytest.raises(FileNotFoundError):
        connect_unix_target(listening.with_name("gone.sock"))
