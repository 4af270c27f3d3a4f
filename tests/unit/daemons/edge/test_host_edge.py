"""Host edges against fake plane servers: started detached and clean, reused, replaced, stopped; routed by mode."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets

from daemons.edge import DESKTOP_TOKEN_PORT
from daemons.edge.host import HostEdgeLayout, HostEdges, drop_key, write_key
from sandbox.stream_token import StreamTokenKey, derive_lease_key
from tests.conftest import process_alive, wait_until_gone

pytestmark = pytest.mark.timeout(60)

ROOT = b"unit-root"
LEASE = "lease/ws/host-edge"
MARKER = "SANDBOX_TEST_BOX_ID"


class FakeVnc:
    """A unix socket server that greets every client with ``banner`` (12 bytes, like RFB's)."""

    def __init__(self, path: Path, banner: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.banner = banner
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(self.banner)
                conn.recv(1)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Box:
    layout: HostEdgeLayout
    box_id: str
    control: FakeVnc
    view: FakeVnc


@pytest.fixture
def edges(monkeypatch: pytest.MonkeyPatch) -> HostEdges:
    # A secret in the worker's environment must not reach the edge.
    monkeypatch.setenv("SANDBOX_STREAM_TOKEN_SECRET", "worker-only-secret")
    return HostEdges(marker_var=MARKER)


@pytest.fixture
async def box(tmp_path: Path, edges: HostEdges) -> AsyncIterator[Box]:
    """A fake box: control and view servers in its /tmp, its edge stopped at the end."""
    box_tmp = tmp_path / "box" / "tmp"
    state = box_tmp / ".sandbox-edge" / "desktop"
    state.mkdir(parents=True)
    control = FakeVnc(state / "vnc.sock", b"RFB control\n")
    view = FakeVnc(state / "vnc-view.sock", b"RFB viewing\n")
    layout = HostEdgeLayout(private=tmp_path / "box" / "edge", box_tmp=box_tmp)
    try:
        yield Box(layout, f"box-{uuid.uuid4().hex[:16]}", control, view)
    finally:
        await edges.stop(layout, "desktop")
        control.close()
        view.close()


def _token(epoch: int, mode: str) -> str:
    key = StreamTokenKey(derive_lease_key(ROOT, LEASE, epoch))
    ids = {name: str(uuid.uuid4()) for name in ("workspace_id", "session_id", "viewer_id")}
    return key.mint_for({**ids, "lease_epoch": epoch, "mode": mode, "port": DESKTOP_TOKEN_PORT})


async def _banner(port: int, token: str) -> bytes:
    url = f"ws://127.0.0.1:{port}/"
    async with websockets.connect(url, subprotocols=["binary", token], open_timeout=5) as ws:  # type: ignore[list-item]
        data = await asyncio.wait_for(ws.recv(), 5)
        return data if isinstance(data, bytes) else data.encode()


async def _up(edges: HostEdges, box: Box, epoch: int = 1) -> tuple[int, bool]:
    write_key(box.layout, derive_lease_key(ROOT, LEASE, epoch))
    up = await edges.ensure(box.layout, "desktop", box_id=box.box_id, epoch=epoch)
    return up.port, up.already


async def test_view_and_control_tokens_reach_their_own_server(edges: HostEdges, box: Box) -> None:
    port, already = await _up(edges, box)
    assert not already
    assert await _banner(port, _token(1, "view")) == b"RFB viewing\n"
    assert await _banner(port, _token(1, "control")) == b"RFB control\n"
    # Another epoch's token is refused before either server hears of it.
    accepted = box.control.accepted + box.view.accepted
    with pytest.raises(websockets.InvalidStatus):
        await _banner(port, _token(2, "control"))
    assert box.control.accepted + box.view.accepted == accepted


async def test_the_edge_is_detached_clean_and_marked(edges: HostEdges, box: Box) -> None:
    await _up(edges, box)
    pid = edges.running(box.layout, "desktop")
    assert pid is not None and os.getsid(pid) == pid  # its own session...
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid()  # ...and not this worker's child: it outlives the worker
    environ = dict(
        item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
    )
    assert environ[MARKER.encode()] == box.box_id.encode()
    assert b"SANDBOX_STREAM_TOKEN_SECRET" not in environ and b"worker-only-secret" not in b"".join(environ.values())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert derive_lease_key(ROOT, LEASE, 1).hex().encode() not in cmdline
    assert stat.S_IMODE(box.layout.private.stat().st_mode) == 0o700
    assert stat.S_IMODE(box.layout.key_file.stat().st_mode) == 0o600
    listening = socket.create_connection(("127.0.0.1", int(box.layout.file("desktop", "port").read_text())))
    listening.close()


async def test_a_healthy_edge_is_reused_and_a_new_epoch_replaces_it_on_the_same_port(
    edges: HostEdges, box: Box
) -> None:
    port, _ = await _up(edges, box)
    first = edges.running(box.layout, "desktop")
    again, already = await _up(edges, box)
    assert already and again == port and edges.running(box.layout, "desktop") == first
    newer, already = await _up(edges, box, epoch=2)
    assert not already and newer == port
    second = edges.running(box.layout, "desktop")
    assert second is not None and second != first
    assert first is not None and not process_alive(first)
    assert await _banner(port, _token(2, "view")) == b"RFB viewing\n"


async def test_a_dead_edge_is_replaced_and_stop_ends_it(edges: HostEdges, box: Box) -> None:
    port, _ = await _up(edges, box)
    pid = edges.running(box.layout, "desktop")
    assert pid is not None
    os.killpg(pid, 9)
    await wait_until_gone(pid)
    assert await edges.status(box.layout, "desktop") is None
    again, already = await _up(edges, box)
    assert not already and again == port
    pid = edges.running(box.layout, "desktop")
    await edges.stop(box.layout, "desktop")
    assert pid is not None and not process_alive(pid)
    assert edges.running(box.layout, "desktop") is None
    assert not box.layout.file("desktop", "port").exists()
    drop_key(box.layout)
    assert not box.layout.key_file.exists()


async def test_concurrent_ensures_start_one_edge(edges: HostEdges, box: Box) -> None:
    write_key(box.layout, derive_lease_key(ROOT, LEASE, 1))
    ups = await asyncio.gather(*(edges.ensure(box.layout, "desktop", box_id=box.box_id, epoch=1) for _ in range(4)))
    assert len({up.port for up in ups}) == 1
    assert sorted(up.already for up in ups) == [False, True, True, True]


async def test_a_planted_link_is_not_followed_by_the_host_edge(edges: HostEdges, box: Box) -> None:
    port, _ = await _up(edges, box)
    state = box.layout.box_tmp / ".sandbox-edge" / "desktop"
    # The box swaps the view socket for a link to the control one: a view token gets nothing.
    (state / "vnc-view.sock").unlink()
    (state / "vnc-view.sock").symlink_to(state / "vnc.sock")
    accepted = box.control.accepted
    with pytest.raises(websockets.ConnectionClosed):
        await _banner(port, _token(1, "view"))
    assert box.control.accepted == accepted
    # Positive control: the control socket is still reached by a control token.
    assert await _banner(port, _token(1, "control")) == b"RFB control\n"


async def test_an_edge_whose_box_vanished_exits_by_itself(edges: HostEdges, box: Box, tmp_path: Path) -> None:
    await _up(edges, box)
    pid = edges.running(box.layout, "desktop")
    assert pid is not None
    await asyncio.sleep(2.5)
    assert process_alive(pid)  # positive control: alive while its box is
    # The box directory moves away (terminate renames it into the trash first) without a tear-down.
    (tmp_path / "box").rename(tmp_path / "trashed")
    await wait_until_gone(pid, timeout=6)
    assert not process_alive(pid)
