"""The desktop plane in real local boxes: bring-up, idempotency, concurrency, health, independence, tear-down."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from sandbox.box import Envelope
from sandbox.errors import DisplayStackUnsupported, InvalidRequest
from sandbox.inbox_scripts import EXIT_DOWN, EXIT_UNAVAILABLE, missing_tools
from tests.conftest import process_alive, wait_until_gone
from tests.integration.planes.harness import X_ENV, Box, PlaneHarness, box_files, host_edges, pointer_at
from workflows.models.planes import DisplayStackRequest

pytestmark = pytest.mark.timeout(60)


async def _count(box: Box, name: str) -> int:
    # The box has its own PID namespace: pgrep sees only the box's processes.
    _, out = await box.sh(f"pgrep -cx {name} || true")
    return int(out.strip() or 0)


async def _status(box: Box) -> tuple[int, dict[str, bool]]:
    return await box.status("desktop-up")


_ALL_UP = {"xvfb": True, "x11vnc": True, "x11vnc_view": True}


async def test_cold_bring_up_then_already_up(planes: PlaneHarness) -> None:
    box = await planes.box()
    cold = await planes.activities.ensure_display_stack(box.desktop_request(geometry="1024x768"))
    assert not cold.already_up
    assert cold.geometry == "1024x768" and cold.dpi == 96
    assert cold.marker.startswith(f"SANDBOX_DESKTOP_UP port={cold.port} geometry=1024x768")

    started = time.monotonic()
    warm = await planes.activities.ensure_display_stack(box.desktop_request(geometry="1024x768"))
    elapsed = time.monotonic() - started
    assert warm.already_up
    assert (warm.port, warm.display) == (cold.port, cold.display)
    assert elapsed < 1.0, f"an already-up ensure took {elapsed:.3f}s"
    # Two x11vnc (control and view-only) serve unix sockets inside the box; neither listens on TCP.
    assert await _count(box, "Xvfb") == 1 and await _count(box, "x11vnc") == 2
    assert (box.state_dir / "desktop" / "vnc.sock").is_socket()
    assert (box.state_dir / "desktop" / "vnc-view.sock").is_socket()
    code, out = await box.sh("cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == \"0A\" {print $2}'")
    assert code == 0, out  # an empty answer must not pass for "nothing listens"
    listening = {int(addr.rsplit(":", 1)[1], 16) for addr in out.split()}
    assert 5900 not in listening and 5901 not in listening
    # The edge is a host process of this box, listening on the host's loopback.
    (edge,) = host_edges(box, "desktop")
    assert (box.private_dir / "desktop.port").read_text().strip() == str(cold.port)
    assert planes.activities.host_edges.running(box.layout.edge, "desktop") == edge


async def test_two_concurrent_ensures_bring_up_exactly_one_stack(planes: PlaneHarness) -> None:
    box = await planes.box()
    first, second = await asyncio.gather(
        planes.activities.ensure_display_stack(box.desktop_request()),
        planes.activities.ensure_display_stack(box.desktop_request()),
    )
    assert (first.port, first.display) == (second.port, second.display)
    assert sorted([first.already_up, second.already_up]) == [False, True]
    assert await _count(box, "Xvfb") == 1
    assert await _count(box, "x11vnc") == 2
    # One edge process on the host (websockify forks a child per connection, in its session).
    assert len(host_edges(box, "desktop")) == 1


async def test_killed_x11vnc_is_reported_down_and_brought_back(planes: PlaneHarness) -> None:
    box = await planes.box()
    before = await planes.activities.ensure_display_stack(box.desktop_request())
    code, parts = await _status(box)
    # The edge is not the box's: its status reports only what runs in the box.
    assert code == 0 and parts == _ALL_UP

    await box.sh("pkill -KILL -f '^x11vnc .*-viewonly'; sleep 0.1")
    code, parts = await _status(box)
    # The full x11vnc still answers, yet the stack is down.
    assert code == EXIT_DOWN
    assert parts == {**_ALL_UP, "x11vnc_view": False}

    after = await planes.activities.ensure_display_stack(box.desktop_request())
    assert not after.already_up
    assert (after.port, after.display) == (before.port, before.display)
    code, parts = await _status(box)
    assert code == 0 and all(parts.values())
    assert await _count(box, "x11vnc") == 2


async def test_killed_edge_is_brought_back_on_its_port(planes: PlaneHarness) -> None:
    box = await planes.box()
    before = await planes.activities.ensure_display_stack(box.desktop_request())
    (edge,) = host_edges(box, "desktop")
    os.killpg(edge, signal.SIGKILL)
    await wait_until_gone(edge)
    assert await planes.activities.host_edges.status(box.layout.edge, "desktop") is None
    assert (await _status(box))[0] == 0  # the box's part is fine
    after = await planes.activities.ensure_display_stack(box.desktop_request())
    assert not after.already_up and after.port == before.port
    assert host_edges(box, "desktop") != [edge] and len(host_edges(box, "desktop")) == 1


async def test_an_edge_of_another_epoch_is_replaced(planes: PlaneHarness) -> None:
    box = await planes.box()
    first = await planes.activities.ensure_display_stack(box.desktop_request())
    (edge,) = host_edges(box, "desktop")
    second = await planes.activities.ensure_display_stack(box.desktop_request(epoch=box.epoch + 1))
    # The box's servers stay; the edge is restarted for the new epoch, on the same port.
    assert not second.already_up and second.port == first.port and second.display == first.display
    (new_edge,) = host_edges(box, "desktop")
    assert new_edge != edge
    assert f"--epoch\0{box.epoch + 1}\0".encode() in Path(f"/proc/{new_edge}/cmdline").read_bytes()


async def test_two_boxes_have_independent_desktops(planes: PlaneHarness) -> None:
    a, b = await planes.box(), await planes.box()
    da, db = await asyncio.gather(
        planes.activities.ensure_display_stack(a.desktop_request()),
        planes.activities.ensure_display_stack(b.desktop_request()),
    )
    assert da.port != db.port
    # Each box has its own X server: the pointer moved in one stays put in the other.
    assert (await a.sh(X_ENV + "xdotool mousemove 11 11"))[0] == 0
    assert (await b.sh(X_ENV + "xdotool mousemove 22 22"))[0] == 0
    assert await pointer_at(a) == (11, 11) and await pointer_at(b) == (22, 22)
    if da.display != db.display:
        # Boxes that share the host's network namespace share its abstract X sockets: neither box
        # can open the other's display all the same (cookie authentication). Boxes with their own
        # namespace do not even see the other's server (both may be :0).
        xauth = "/tmp/.sandbox-edge/desktop/xauth"
        code, out = await b.sh(f"XAUTHORITY={xauth} xdpyinfo -display :{da.display}")
        assert code != 0, out
        code, _ = await a.sh(f"XAUTHORITY={xauth} xdpyinfo -display :{da.display} >/dev/null")
        assert code == 0
    # Tearing one down leaves the other up.
    await planes.activities.tear_down_planes(a.ref())
    assert (await _status(a))[0] == EXIT_DOWN
    assert (await _status(b))[0] == 0
    assert host_edges(a, "desktop") == [] and len(host_edges(b, "desktop")) == 1


async def test_tear_down_stops_everything_and_drops_the_key(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.activities.ensure_display_stack(box.desktop_request())
    terminal = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert terminal.available
    assert (box.private_dir / "key").exists()
    assert host_edges(box, "desktop") and host_edges(box, "terminal")
    await planes.activities.tear_down_planes(box.ref())
    for name in ("Xvfb", "x11vnc", "ttyd"):
        assert await _count(box, name) == 0, name
    assert host_edges(box, "desktop") == [] and host_edges(box, "terminal") == []
    assert not (box.private_dir / "key").exists()
    # Idempotent, and the plane comes back on the next ensure.
    await planes.activities.tear_down_planes(box.ref())
    again = await planes.activities.ensure_display_stack(box.desktop_request())
    assert not again.already_up


async def test_tear_down_of_a_gone_box_is_not_an_error(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.provider.terminate(box.session.serialize_state())
    await planes.activities.tear_down_planes(box.ref())


async def test_terminating_the_box_stops_its_host_edges(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.activities.ensure_display_stack(box.desktop_request())
    await planes.activities.ensure_terminal_server(box.terminal_request())
    edges = host_edges(box, "desktop") + host_edges(box, "terminal")
    assert len(edges) == 2
    # The edges carry the box's marker, so the provider's terminate kills them with the box.
    await planes.provider.terminate(box.session.serialize_state())
    await wait_until_gone(*edges)
    assert not any(process_alive(pid) for pid in edges)


async def test_the_key_file_is_private_and_holds_the_derived_key(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.activities.ensure_display_stack(box.desktop_request())
    key_file = box.private_dir / "key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert box.private_dir.stat().st_mode & 0o777 == 0o700
    from sandbox.stream_token import derive_lease_key

    assert key_file.read_text().strip() == derive_lease_key(planes.root, box.lease_id, box.epoch).hex()
    # No key in the box's own directories (the scripts are given none).
    assert not (box.state_dir / "key").exists()
    # The root secret itself is nowhere in the box.
    root = planes.root
    for path in box_files(box):
        assert root not in path.read_bytes(), path


@pytest.mark.parametrize("geometry", ["1280", "0x0", "99999x10", "1280x800; rm -rf /", "-1x800"])
async def test_bad_geometry_is_a_typed_error(planes: PlaneHarness, geometry: str) -> None:
    box = await planes.box("geometry")
    with pytest.raises(ApplicationError) as caught:
        await planes.activities.ensure_display_stack(box.desktop_request(geometry=geometry))
    assert caught.value.type == InvalidRequest.error_type and caught.value.non_retryable


async def test_missing_tools_make_the_desktop_unsupported(planes: PlaneHarness) -> None:
    box = await planes.box()
    # A PATH with the shell's tools but without Xvfb: the plane is unavailable (16), not broken.
    tools = "mkdir cat mv rm od tr seq sleep flock setsid xauth x11vnc"
    code, out = await box.sh(f"mkdir -p /tmp/bin && for t in {tools}; do ln -sf $(command -v $t) /tmp/bin/; done")
    assert code == 0, out
    argv = box.layout.scripts.command("desktop-up")
    env = {**box.layout.env, "SANDBOX_EDGE_EXTERNAL": "1", "PATH": "/tmp/bin"}
    result = await box.session.exec(["/bin/bash", *argv[1:]], env=env, timeout=30)
    assert result.exit_code == EXIT_UNAVAILABLE, result
    assert missing_tools(result.stdout.decode()) == ["Xvfb"]


async def test_a_backend_without_boxes_is_unsupported(planes: PlaneHarness) -> None:
    envelope = Envelope(backend_id="none", instance_id="nothing")
    request = DisplayStackRequest(backend="none", envelope=envelope, lease_id="lease/w/g", epoch=1)
    with pytest.raises(ApplicationError) as caught:
        await planes.activities.ensure_display_stack(request)
    assert caught.value.type == DisplayStackUnsupported.error_type and caught.value.non_retryable
