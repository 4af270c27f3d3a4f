"""The desktop and terminal planes of a docker box on a real engine (podman), through the edge.

The plane activities bring the planes up in a hardened box of the box image exactly as for any
remote backend (the in-box scripts, the key on stdin, the edge in the box); a viewer reaches the
edge through the port the engine published on the host, and the edge admits only a valid token:
VNC for the desktop, ttyd for the terminal (a command typed through it runs in the box). Computer
use (ImageMagick's screenshot, xdotool input) runs through its activities in the same box. Skipped
only when podman is absent.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from activities.computer_use import ComputerUseActivities
from providers.docker import DockerBoxSession, DockerProvider, DockerSettings
from providers.registry import ProviderRegistry
from sandbox.box import BoxSpec
from sandbox.settings import Settings
from tests.container_engine import ContainerEngine
from tests.integration.planes.harness import ROOT_SECRET, PlaneHarness
from workflows.models.computer_use import DesktopInputInput, MoveAction, ScreenshotInput
from workflows.models.planes import DisplayStackRequest, TearDownPlanesRequest, TerminalServerRequest

pytestmark = [pytest.mark.container_engine, pytest.mark.timeout(120)]


@dataclass
class EnginePlanes:
    harness: PlaneHarness
    box: DockerBoxSession
    lease_id: str
    desktop_url: str
    terminal_url: str
    computer: ComputerUseActivities


@pytest.fixture(scope="module")
async def up(
    container_engine: ContainerEngine, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EnginePlanes]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("engine-planes"), stream_token_secret=ROOT_SECRET)
    provider = DockerProvider(
        DockerSettings(host=container_engine.host, image=container_engine.image, owner=container_engine.owner)
    )
    registry = ProviderRegistry(settings, {"docker": provider})
    harness = PlaneHarness(settings, registry)
    group = uuid.uuid4().hex[:8]
    lease_id = f"lease/ws-engine-planes/{group}"
    box = await provider.create(
        BoxSpec(lease_id=lease_id, workspace_id="ws-engine-planes", group_id=group, epoch=1), f"{lease_id}#1"
    )
    envelope = box.serialize_state()
    try:
        desktop, terminal = await asyncio.gather(
            harness.activities.ensure_display_stack(
                DisplayStackRequest(backend="docker", envelope=envelope, lease_id=lease_id, epoch=1)
            ),
            harness.activities.ensure_terminal_server(
                TerminalServerRequest(backend="docker", envelope=envelope, lease_id=lease_id, epoch=1)
            ),
        )
        assert terminal.available and terminal.port is not None, terminal
        desktop_at = await box.resolve_exposed_port(desktop.port)
        terminal_at = await box.resolve_exposed_port(terminal.port)
        yield EnginePlanes(
            harness,
            box,
            lease_id,
            f"ws://{desktop_at.host}:{desktop_at.port}/",
            f"ws://{terminal_at.host}:{terminal_at.port}/",
            ComputerUseActivities(registry, settings, harness.activities),
        )
        await harness.activities.tear_down_planes(TearDownPlanesRequest(backend="docker", envelope=envelope))
    finally:
        await provider.terminate(envelope)
        await registry.aclose()


async def _status(url: str, protocols: list[str]) -> int:
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(url, subprotocols=protocols, open_timeout=10):  # type: ignore[arg-type]
            pass
    return caught.value.response.status_code


async def test_the_desktop_edge_admits_a_valid_token_to_vnc_and_refuses_others(up: EnginePlanes) -> None:
    token = up.harness.mint(up.lease_id, 1)
    async with websockets.connect(up.desktop_url, subprotocols=["binary", token]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "binary"
        assert await asyncio.wait_for(ws.recv(), 10) == b"RFB 003.008\n"
    assert await _status(up.desktop_url, ["binary"]) == 403
    assert await _status(up.desktop_url, ["binary", up.harness.mint(up.lease_id, 2)]) == 403, "another epoch"


async def test_a_command_typed_through_the_terminal_edge_runs_in_the_box(up: EnginePlanes) -> None:
    token = up.harness.mint(up.lease_id, 1, plane="terminal", mode="control")
    marker = uuid.uuid4().hex
    async with websockets.connect(up.terminal_url, subprotocols=["tty", token]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "tty"
        await ws.send(json.dumps({"AuthToken": "", "columns": 120, "rows": 30}))
        await ws.send(b"0" + f"echo {marker} > typed.txt; id -u\r".encode())
        seen = b""
        async with asyncio.timeout(20):
            while b"1000" not in seen.split(marker.encode())[-1]:
                frame = await ws.recv()
                data = frame if isinstance(frame, bytes) else frame.encode()
                if data[:1] == b"0":
                    seen += data[1:]
    assert (await up.box.read_file("typed.txt")).strip() == marker.encode()
    assert await _status(up.terminal_url, ["tty"]) == 403
    assert await _status(up.terminal_url, ["tty", up.harness.mint(up.lease_id, 1)]) == 403, "a desktop token"


async def test_computer_use_screenshots_and_moves_the_pointer_in_the_box(up: EnginePlanes) -> None:
    envelope = up.box.serialize_state()
    shot = await up.computer.screenshot(
        ScreenshotInput(backend="docker", envelope=envelope, lease_id=up.lease_id, epoch=1)
    )
    assert shot.png.startswith(b"\x89PNG") and (shot.screen_width, shot.screen_height) == (1280, 800)
    moved = await up.computer.desktop_input(
        DesktopInputInput(
            backend="docker", envelope=envelope, lease_id=up.lease_id, epoch=1, actions=[MoveAction(x=321, y=123)]
        )
    )
    assert (moved.performed, moved.pointer_x, moved.pointer_y) == (1, 321, 123)
