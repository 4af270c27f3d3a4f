"""A person's view of the terminal: xterm.js in headless Chromium runs a command in the box.

On local boxes and on docker boxes of the real engine (the ``planes`` fixture's two backends).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from cli.planes import ViewerPage, find_assets
from tests.integration.planes.harness import PlaneHarness

pytestmark = pytest.mark.timeout(90)

# What the terminal shows, as rendered text (xterm.js's DOM renderer draws one element per row).
_SCREEN_TEXT = "(document.querySelector('#term .xterm-rows') || {innerText: ''}).innerText"


async def _terminal_port(planes: PlaneHarness) -> tuple[Any, int]:
    box = await planes.viewer_box()
    terminal = await planes.activities.ensure_terminal_server(box.terminal_request())
    assert terminal.available and terminal.port is not None
    return box, terminal.port


async def _open(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A new page on ``url`` that records every URL it requests (HTTP and WebSocket)."""
    page = await browser.new_page(viewport={"width": 1000, "height": 700})
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    page.on("websocket", lambda ws: seen.append(ws.url))
    await page.goto(url)
    return page, seen


async def test_a_command_typed_in_the_page_runs_in_the_box(planes: PlaneHarness, browser: Any, tmp_path: Path) -> None:
    box, port = await _terminal_port(planes)
    token = planes.mint(box.lease_id, box.epoch, plane="terminal", mode="control")
    cell = {"url": await box.edge_url(port), "token": token, "epoch": box.epoch, "mode": "control"}
    viewer = ViewerPage("terminal", lambda: cell, find_assets("terminal")).start()
    try:
        assert token not in viewer.url
        page, seen = await _open(browser, viewer.url)
        await page.wait_for_function("window.viewerState === 'connected'", timeout=15000)
        await page.wait_for_function(f"{_SCREEN_TEXT}.trim().length > 0", timeout=10000)  # the prompt
        await page.click("#term")
        # The shell computes 42: the typed line itself never contains the marker.
        await page.keyboard.type("echo marker-$((6*7))")
        await page.keyboard.press("Enter")
        try:
            await page.wait_for_function(f"{_SCREEN_TEXT}.includes('marker-42')", timeout=10000)
        finally:
            await page.screenshot(path=str(tmp_path / "terminal.png"))
        text = await page.evaluate(_SCREEN_TEXT)
        assert "echo marker-$((6*7))" in text and "/workspace" in text
        # Everything the page loaded came from this machine: the viewer page and the edge.
        assert seen and {urlsplit(url).hostname for url in seen} == {"127.0.0.1"}
        assert all(token not in url for url in seen)
        await page.close()
    finally:
        viewer.stop()


async def test_a_tampered_token_shows_no_terminal(planes: PlaneHarness, browser: Any) -> None:
    box, port = await _terminal_port(planes)
    payload, signature = planes.mint(box.lease_id, box.epoch, plane="terminal").rsplit(".", 1)
    cell = {"url": await box.edge_url(port), "token": f"{payload}.{signature[::-1]}", "epoch": box.epoch}
    viewer = ViewerPage("terminal", lambda: cell, find_assets("terminal")).start()
    try:
        page, _ = await _open(browser, viewer.url)
        await page.wait_for_function("window.viewerState !== 'connecting'", timeout=15000)
        assert await page.evaluate("window.viewerState") == "refused"
        await page.wait_for_timeout(1500)  # a retry would have reconnected by now
        assert await page.evaluate("window.viewerState") == "refused"
        assert (await page.evaluate(_SCREEN_TEXT)).strip() == ""
        await page.close()
    finally:
        viewer.stop()
