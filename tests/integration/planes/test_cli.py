"""``sandboxctl desktop attach`` / ``terminal attach`` against a real worker, and the viewer page server."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import websockets
from typer.testing import CliRunner

from cli.main import _register, app
from cli.planes import ViewerPage, find_assets

_register()
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cli_env(runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = runtime.settings
    monkeypatch.setenv("SANDBOX_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", runtime.client.service_client.config.target_host)
    monkeypatch.setenv("SANDBOX_TASK_QUEUE", s.task_queue)


async def sandboxctl(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), catch_exceptions=False)


async def test_attach_prints_the_cell_token_only_with_json(runtime: Any, cli_env: None) -> None:
    ws, group = "cli-planes", f"g-{uuid.uuid4().hex[:6]}"
    res = await sandboxctl("desktop", "attach", ws, group, "--json")
    assert res.exit_code == 0, res.output
    cell = json.loads(res.stdout)
    assert cell["plane"] == "desktop" and cell["transport"] == "vnc-ws"
    assert cell["token"].startswith("ogs_") and cell["token"] not in cell["url"]
    async with websockets.connect(cell["url"], subprotocols=["binary", cell["token"]]) as conn:  # type: ignore[list-item]
        assert await asyncio.wait_for(conn.recv(), 5) == b"RFB 003.008\n"

    assert cell["mode"] == "view"

    res = await sandboxctl("terminal", "attach", ws, group, "--viewer", cell["viewer_id"])
    assert res.exit_code == 0, res.output
    assert "ogs_" not in res.stdout and "pty-ws" in res.stdout and ", view)" in res.stdout

    res = await sandboxctl("terminal", "attach", ws, group, "--viewer", cell["viewer_id"], "--control", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["mode"] == "control"
    await runtime.leases().release(ws, group, cell["viewer_id"], kind="viewer")


def test_the_viewer_page_serves_the_cell_and_novnc_but_nothing_else(tmp_path: Path) -> None:
    cell = {"url": "ws://127.0.0.1:1/", "token": "ogs_x.y"}
    page = ViewerPage("desktop", lambda: cell, find_assets("desktop")).start()
    try:
        assert "ogs_" not in page.url
        with urllib.request.urlopen(page.url) as r:
            assert b"wsProtocols: ['binary', cell.token]" in r.read()
        with urllib.request.urlopen(page.url + "cell.json") as r:
            assert json.loads(r.read()) == cell
        with urllib.request.urlopen(page.url + "novnc/core/rfb.js") as r:
            assert r.headers["Content-Type"] == "text/javascript"
        for bad in ("novnc/../../../etc/passwd", "../cell.json"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(page.url + bad)
        root = page.url.rsplit("/", 2)[0] + "/"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(root + "cell.json")
    finally:
        page.stop()
