"""Computer use on a real local box: screenshots with ImageMagick, input with xdotool into an xterm."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator

import pytest
from temporalio.exceptions import ApplicationError

from activities.computer_use import ComputerUseActivities
from tests.integration.planes.harness import Box, PlaneHarness, plane_harness
from workflows.models.computer_use import (
    ClickAction,
    DesktopInputInput,
    DoubleClickAction,
    DragAction,
    KeyAction,
    MoveAction,
    ScreenshotInput,
    ScrollAction,
    TypeAction,
)

pytestmark = pytest.mark.timeout(90)

# xev prints every key event its window receives: the typed text can be read back from its log.
XEV = (
    'EDGE=${TMPDIR:-/tmp}/.sandbox-edge; read -r n <"$EDGE/desktop/display"; '
    'DISPLAY=":$n" XAUTHORITY="$EDGE/desktop/xauth" setsid stdbuf -oL xev -geometry 400x300+0+0 -event keyboard '
    "</dev/null >/tmp/xev.log 2>&1 &"
)
_LOOKUP = re.compile(r"XLookupString gives \d+ bytes: \(([0-9a-f ]*)\)")


def typed_text(xev_log: str) -> str:
    """The characters of the KeyPress events in xev's log, in order."""
    text = ""
    for event in xev_log.split("KeyPress event")[1:]:
        m = _LOOKUP.search(event.split("KeyRelease event")[0])
        if m and m[1].strip():
            text += bytes.fromhex(m[1]).decode("utf-8", "replace")
    return text


@pytest.fixture(scope="module")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PlaneHarness]:
    async with plane_harness(tmp_path_factory.mktemp("computer-use")) as harness:
        yield harness


def computer(planes: PlaneHarness, **policy: bool) -> ComputerUseActivities:
    settings = planes.settings.model_copy(update=policy)
    return ComputerUseActivities(planes.registry, settings, planes.activities)


def shot(box: Box) -> ScreenshotInput:
    return ScreenshotInput(backend="local", envelope=box.envelope, lease_id=box.lease_id, epoch=box.epoch)


def actions(box: Box, *acts: object) -> DesktopInputInput:
    return DesktopInputInput.model_validate(
        {"backend": "local", "envelope": box.envelope, "lease_id": box.lease_id, "epoch": box.epoch, "actions": acts}
    )


async def test_typed_text_reaches_a_window_and_the_screen_changes(planes: PlaneHarness) -> None:
    box = await planes.box()
    cu = computer(planes)
    blank = await cu.screenshot(shot(box))  # brings the desktop up on the way
    assert blank.png.startswith(b"\x89PNG") and (blank.width, blank.height) == (1280, 800)
    assert (blank.screen_width, blank.screen_height, blank.scale) == (1280, 800, 1.0)

    code, out = await box.sh(XEV)
    assert code == 0, out
    log = box.session.tmp_path / "xev.log"
    text = f"Hello, sandbox {secrets.token_hex(3)}!"

    async def window_up() -> bool:
        code, out = await box.sh(
            'EDGE=/tmp/.sandbox-edge; read -r n <"$EDGE/desktop/display"; '
            'DISPLAY=":$n" XAUTHORITY="$EDGE/desktop/xauth" xdotool search --onlyvisible --name "Event Tester"'
        )
        return code == 0 and bool(out.strip())

    for _ in range(50):
        if await window_up():
            break
        await asyncio.sleep(0.1)
    assert await window_up(), "xev's window never appeared"
    # The window has keyboard focus while the pointer is over it (no window manager: PointerRoot).
    await cu.desktop_input(actions(box, ClickAction(x=200, y=150), TypeAction(text=text), KeyAction(keys=["Return"])))
    for _ in range(50):
        if typed_text(log.read_text()).startswith(text + "\r"):
            break
        await asyncio.sleep(0.1)
    assert typed_text(log.read_text()) == text + "\r", log.read_text()[-2000:]

    after = await cu.screenshot(shot(box))
    assert after.png != blank.png and (after.width, after.height) == (1280, 800)


async def test_pointer_actions_end_where_they_say(planes: PlaneHarness) -> None:
    box = await planes.box()
    cu = computer(planes)
    result = await cu.desktop_input(
        actions(
            box,
            MoveAction(x=10, y=20),
            DoubleClickAction(x=300, y=200),
            ScrollAction(direction="down", amount=2, x=400, y=300),
            DragAction(x=100, y=100, to_x=640, to_y=400),
            KeyAction(keys=["ctrl+a", "Escape"]),
        )
    )
    assert (result.performed, result.pointer_x, result.pointer_y) == (5, 640, 400)
    assert result.display >= 0


async def test_a_big_screenshot_is_scaled_down_to_fit(planes: PlaneHarness) -> None:
    box = await planes.box()
    cu = computer(planes)
    small = await cu.screenshot(shot(box))  # brings the desktop up
    assert small.scale == 1.0
    # Noise does not compress: a window full of random pixels makes a PNG far over the limit.
    code, out = await box.sh(
        "convert -size 1280x800 xc: +noise Random /tmp/noise.png && "
        'EDGE=/tmp/.sandbox-edge; read -r n <"$EDGE/desktop/display"; '
        'DISPLAY=":$n" XAUTHORITY="$EDGE/desktop/xauth" setsid display -geometry +0+0 /tmp/noise.png '
        "</dev/null >/dev/null 2>&1 &"
    )
    assert code == 0, out
    for _ in range(50):
        if len((await cu.screenshot(shot(box))).png) > 1_000_000:
            break
        await asyncio.sleep(0.1)
    big = await cu.screenshot(shot(box).model_copy(update={"max_png_bytes": 200_000}))
    assert len(big.png) <= 200_000 and big.scale < 1.0
    assert big.width < 1280 and (big.screen_width, big.screen_height) == (1280, 800)


async def test_read_only_refuses_input_but_allows_screenshots(planes: PlaneHarness) -> None:
    box = await planes.box()
    cu = computer(planes, computer_use_read_only=True)
    assert (await cu.screenshot(shot(box))).png.startswith(b"\x89PNG")
    with pytest.raises(ApplicationError) as err:
        await cu.desktop_input(actions(box, ClickAction(x=1, y=1)))
    assert err.value.type == "ComputerUseReadOnly" and err.value.non_retryable


async def test_disabled_refuses_everything(planes: PlaneHarness) -> None:
    box = await planes.box()
    cu = computer(planes, computer_use_enabled=False)
    for call in (cu.screenshot(shot(box)), cu.desktop_input(actions(box, TypeAction(text="x")))):
        with pytest.raises(ApplicationError) as err:
            await call
        assert err.value.type == "ComputerUseDisabled"
