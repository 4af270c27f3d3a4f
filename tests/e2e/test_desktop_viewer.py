"""A person's view of the desktop: noVNC in headless Chromium shows a window drawn inside the box.

On local boxes and on docker boxes of the real engine (the ``planes`` fixture's two backends).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from cli.planes import ViewerPage, find_assets
from tests.integration.planes.harness import PlaneHarness, ViewerBox
from workflows.models.planes import DisplayStackResult

pytestmark = pytest.mark.timeout(90)

# Counts the near-white pixels of noVNC's canvas: the desktop's root window is black, so they
# can only come from a window drawn in the box (xmessage's background is white).
_BRIGHT_PIXELS = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width) return -1;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] > 200 && data[i + 1] > 200 && data[i + 2] > 200) n++;
  return n;
}"""


async def _draw_hello(box: ViewerBox, display: int) -> None:
    env = {"DISPLAY": f":{display}", "XAUTHORITY": "/tmp/.sandbox-edge/desktop/xauth"}
    code, out = await box.sh(
        "setsid xmessage -center -geometry 320x120 hello </dev/null >/tmp/xmessage.log 2>&1 & "
        "for i in $(seq 100); do xwininfo -root -tree | grep -q '\"xmessage\"' && exit 0; sleep 0.05; done; "
        "cat /tmp/xmessage.log; exit 1",
        env=env,
    )
    assert code == 0, out


@pytest.fixture(scope="module")
async def hello(planes: PlaneHarness) -> tuple[ViewerBox, DisplayStackResult]:
    """A box whose desktop shows an xmessage window saying hello."""
    box = await planes.viewer_box()
    desktop = await planes.activities.ensure_display_stack(box.desktop_request(geometry="800x600"))
    await _draw_hello(box, desktop.display)
    return box, desktop


async def _open(browser: Any, page_url: str) -> Any:
    page = await browser.new_page(viewport={"width": 900, "height": 700})
    await page.goto(page_url)
    return page


async def test_a_window_drawn_in_the_box_shows_in_the_viewer(
    planes: PlaneHarness, browser: Any, hello: tuple[ViewerBox, DisplayStackResult], tmp_path: Path
) -> None:
    box, desktop = hello
    cell = {"url": await box.edge_url(desktop.port), "token": planes.mint(box.lease_id, box.epoch)}
    viewer = ViewerPage("desktop", lambda: cell, find_assets("desktop")).start()
    try:
        assert cell["token"] not in viewer.url
        page = await _open(browser, viewer.url)
        await page.wait_for_function("window.viewerState === 'connected'", timeout=15000)
        bright = -1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            bright = await page.evaluate(_BRIGHT_PIXELS)
            if bright > 5000:
                break
            await page.wait_for_timeout(100)
        await page.screenshot(path=str(tmp_path / "desktop.png"))
        # xmessage's 320x120 window (minus its text and border) is on screen.
        assert bright > 5000, f"only {bright} bright pixels; see {tmp_path / 'desktop.png'}"
        await page.close()
    finally:
        viewer.stop()


async def test_a_tampered_token_shows_no_desktop(
    planes: PlaneHarness, browser: Any, hello: tuple[ViewerBox, DisplayStackResult], tmp_path: Path
) -> None:
    box, desktop = hello
    token = planes.mint(box.lease_id, box.epoch)
    payload, signature = token.rsplit(".", 1)
    tampered = f"{payload}.{signature[::-1]}"
    cell = {"url": await box.edge_url(desktop.port), "token": tampered}
    viewer = ViewerPage("desktop", lambda: cell, find_assets("desktop")).start()
    try:
        page = await _open(browser, viewer.url)
        await page.wait_for_function("window.viewerState !== 'connecting'", timeout=15000)
        assert await page.evaluate("window.viewerState") != "connected"
        await page.wait_for_timeout(500)
        await page.screenshot(path=str(tmp_path / "refused.png"))
        assert await page.evaluate(_BRIGHT_PIXELS) <= 0
        await page.close()
    finally:
        viewer.stop()
