"""The desktop plane in real local boxes: bring-up, idempotency, concurrency, health, independence, tear-down."""

from __future__ import annotations

import asyncio
import time

import pytest
from temporalio.exceptions import ApplicationError

from activities.models import DisplayStackRequest
from sandbox.errors import DisplayStackUnsupported, InvalidRequest
from sandbox.inbox_scripts import (
    EXIT_DOWN,
    EXIT_UNAVAILABLE,
    InboxScripts,
    host_edge_environment,
    missing_tools,
    parse_status,
)
from tests.integration.planes.harness import Box, PlaneHarness
from workflows.models import BoxEnvelope

pytestmark = pytest.mark.timeout(60)


async def _count(box: Box, name: str) -> int:
    # The box has its own PID namespace: pgrep sees only the box's processes.
    _, out = await box.sh(f"pgrep -cx {name} || true")
    return int(out.strip() or 0)


async def _status(box: Box) -> tuple[int, dict[str, bool]]:
    argv = InboxScripts.on_host().command("desktop-up", "--status")
    result = await box.session.exec(argv, env=host_edge_environment(), timeout=30)
    status = parse_status(result.stdout.decode())
    assert status is not None, result
    return result.exit_code, status.parts


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
    # The edge is the only TCP listener; x11vnc serves a unix socket inside the box.
    assert await _count(box, "Xvfb") == 1 and await _count(box, "x11vnc") == 1
    code, out = await box.sh("cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == \"0A\" {print $2}'")
    listening = {int(addr.rsplit(":", 1)[1], 16) for addr in out.split()}
    assert cold.port in listening and 5900 not in listening


async def test_two_concurrent_ensures_bring_up_exactly_one_stack(planes: PlaneHarness) -> None:
    box = await planes.box()
    first, second = await asyncio.gather(
        planes.activities.ensure_display_stack(box.desktop_request()),
        planes.activities.ensure_display_stack(box.desktop_request()),
    )
    assert (first.port, first.display) == (second.port, second.display)
    assert sorted([first.already_up, second.already_up]) == [False, True]
    assert await _count(box, "Xvfb") == 1
    assert await _count(box, "x11vnc") == 1
    # One edge process (re-parented to the box's init; websockify forks a child per connection).
    _, out = await box.sh("pgrep -c -P 1 -f '[s]andbox.edge desktop' || true")
    assert out.strip() == "1"


async def test_killed_x11vnc_is_reported_down_and_brought_back(planes: PlaneHarness) -> None:
    box = await planes.box()
    before = await planes.activities.ensure_display_stack(box.desktop_request())
    code, parts = await _status(box)
    assert code == 0 and parts == {"xvfb": True, "x11vnc": True, "websockify": True}

    await box.sh("pkill -KILL -x x11vnc; sleep 0.1")
    code, parts = await _status(box)
    # websockify still answers, yet the stack is down.
    assert code == EXIT_DOWN
    assert parts == {"xvfb": True, "x11vnc": False, "websockify": True}

    after = await planes.activities.ensure_display_stack(box.desktop_request())
    assert not after.already_up
    assert (after.port, after.display) == (before.port, before.display)
    code, parts = await _status(box)
    assert code == 0 and all(parts.values())
    assert await _count(box, "x11vnc") == 1


async def test_killed_websockify_is_reported_down_and_brought_back(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.activities.ensure_display_stack(box.desktop_request())
    await box.sh("pkill -KILL -f '[s]andbox.edge desktop'; sleep 0.1")
    code, parts = await _status(box)
    assert code == EXIT_DOWN and parts["websockify"] is False and parts["x11vnc"] is True
    after = await planes.activities.ensure_display_stack(box.desktop_request())
    assert not after.already_up
    code, parts = await _status(box)
    assert code == 0


async def test_two_boxes_have_independent_desktops(planes: PlaneHarness) -> None:
    a, b = await planes.box(), await planes.box()
    da, db = await asyncio.gather(
        planes.activities.ensure_display_stack(a.desktop_request()),
        planes.activities.ensure_display_stack(b.desktop_request()),
    )
    assert da.port != db.port
    # Boxes share the host's network namespace, hence its abstract X sockets: the displays differ...
    assert da.display != db.display
    # ...and neither box can open the other's display (cookie authentication).
    xauth = "/tmp/.sandbox-edge/desktop/xauth"
    code, out = await b.sh(f"XAUTHORITY={xauth} xdpyinfo -display :{da.display}")
    assert code != 0, out
    code, _ = await a.sh(f"XAUTHORITY={xauth} xdpyinfo -display :{da.display} >/dev/null")
    assert code == 0
    # Tearing one down leaves the other up.
    await planes.activities.tear_down_planes(a.ref())
    assert (await _status(a))[0] == EXIT_DOWN
    assert (await _status(b))[0] == 0


async def test_tear_down_stops_everything_and_drops_the_key(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.activities.ensure_display_stack(box.desktop_request())
    terminal = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert terminal.available
    assert (box.edge_dir / "key").exists()
    await planes.activities.tear_down_planes(box.ref())
    for name in ("Xvfb", "x11vnc", "ttyd"):
        assert await _count(box, name) == 0, name
    _, out = await box.sh("pgrep -fc '[s]andbox.edge' || true")
    assert out.strip() == "0"
    assert not (box.edge_dir / "key").exists()
    # Idempotent, and the plane comes back on the next ensure.
    await planes.activities.tear_down_planes(box.ref())
    again = await planes.activities.ensure_display_stack(box.desktop_request())
    assert not again.already_up


async def test_tear_down_of_a_gone_box_is_not_an_error(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.provider.terminate(box.session.serialize_state())
    await planes.activities.tear_down_planes(box.ref())


async def test_the_key_file_is_private_and_holds_the_derived_key(planes: PlaneHarness) -> None:
    box = await planes.box()
    await planes.activities.ensure_display_stack(box.desktop_request())
    key_file = box.edge_dir / "key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    from sandbox.stream_token import derive_lease_key

    assert key_file.read_text().strip() == derive_lease_key(planes.root, box.lease_id, box.epoch).hex()
    # The root secret itself is nowhere in the box.
    root = planes.root
    for path in box.session.path.rglob("*"):
        if path.is_file() and not path.is_symlink():
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
    argv = InboxScripts.on_host().command("desktop-up")
    env = {**host_edge_environment(), "PATH": "/tmp/bin"}
    result = await box.session.exec(["/bin/bash", *argv[1:]], env=env, timeout=30)
    assert result.exit_code == EXIT_UNAVAILABLE, result
    assert missing_tools(result.stdout.decode()) == ["Xvfb"]


async def test_a_backend_without_boxes_is_unsupported(planes: PlaneHarness) -> None:
    envelope = BoxEnvelope(backend_id="none", instance_id="nothing")
    request = DisplayStackRequest(backend="none", envelope=envelope, lease_id="lease/w/g", epoch=1)
    with pytest.raises(ApplicationError) as caught:
        await planes.activities.ensure_display_stack(request)
    assert caught.value.type == DisplayStackUnsupported.error_type and caught.value.non_retryable
