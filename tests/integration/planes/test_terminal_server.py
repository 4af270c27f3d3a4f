"""The terminal plane and ENSURE_PLANE in real local boxes: idempotency, health, degradation, exposure."""

from __future__ import annotations

import pytest
from temporalio.exceptions import ApplicationError

import activities.planes as planes_module
from activities.planes import LocalBoxLayout
from sandbox.errors import StreamPortUnavailable, TerminalServerUnsupported
from sandbox.inbox_scripts import EXIT_DOWN
from tests.integration.planes.harness import Box, PlaneHarness
from workflows.models.planes import ExposeStreamPortRequest, PlaneRequest

pytestmark = pytest.mark.timeout(60)


async def _status(box: Box) -> tuple[int, dict[str, bool]]:
    return await box.status("terminal-up")


async def test_terminal_is_idempotent_and_heals(planes: PlaneHarness) -> None:
    box = await planes.box()
    first = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert first.available and not first.already_up and first.port
    again = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert again.already_up and again.port == first.port

    assert await box.sh("pgrep -cx ttyd") == (0, "2\n")  # writable and read-only
    await box.sh("pkill -KILL -f '^[^ ]*ttyd --writable'; sleep 0.1")
    code, parts = await _status(box)
    assert code == EXIT_DOWN and parts == {"ttyd": False, "ttyd_view": True}
    healed = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert healed.available and not healed.already_up and healed.port == first.port
    assert (await _status(box))[0] == 0


async def test_without_ttyd_the_terminal_degrades_to_a_value(
    planes: PlaneHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = planes_module.local_box_layout

    def without_ttyd(session: object) -> LocalBoxLayout:
        layout = real(session)  # type: ignore[arg-type]
        # A PATH without ttyd, and no copy of the wheel's either.
        return LocalBoxLayout(layout.edge, layout.scripts, {"PATH": "/usr/bin:/bin", "TTYD_SOURCE": ""})

    monkeypatch.setattr(planes_module, "local_box_layout", without_ttyd)
    box = await planes.box()
    result = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert not result.available and result.port is None
    assert result.reason == "missing: ttyd"
    request = PlaneRequest(
        backend="local", envelope=box.envelope, lease_id=box.lease_id, epoch=box.epoch, plane="terminal"
    )
    with pytest.raises(ApplicationError) as caught:
        await planes.activities.ensure_plane(request)
    assert caught.value.type == TerminalServerUnsupported.error_type and caught.value.non_retryable


async def test_ensure_plane_returns_where_a_viewer_connects(planes: PlaneHarness) -> None:
    box = await planes.box()
    for plane, transport in (("desktop", "vnc-ws"), ("terminal", "pty-ws")):
        request = PlaneRequest(
            backend="local", envelope=box.envelope, lease_id=box.lease_id, epoch=box.epoch, plane=plane
        )
        endpoint = await planes.activities.ensure_plane(request)
        assert endpoint.plane == plane and endpoint.transport == transport
        assert endpoint.url == f"ws://127.0.0.1:{endpoint.port}/"
        assert endpoint.host == "127.0.0.1" and not endpoint.tls
        assert endpoint.resolution == ("1280x800" if plane == "desktop" else None)


async def test_a_port_that_cannot_be_exposed_is_stream_port_unavailable(planes: PlaneHarness) -> None:
    box = await planes.box()
    request = ExposeStreamPortRequest(backend="local", envelope=box.envelope, plane="desktop", port=70000)
    with pytest.raises(ApplicationError) as caught:
        await planes.activities.expose_stream_port(request)
    assert caught.value.type == StreamPortUnavailable.error_type
