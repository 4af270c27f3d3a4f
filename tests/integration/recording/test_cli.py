"""``sandboxctl record ...`` and ``sandboxctl desktop screenshot|click|type|key`` against a real worker."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.exits import EXIT_FENCED, EXIT_NOT_FOUND, EXIT_REFUSED
from cli.main import _register, app
from tests.conftest import ids
from tests.integration.recording.conftest import ffprobe
from tests.integration.test_lease_workflow import record_history

_register()
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cli_env(runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = runtime.settings
    monkeypatch.setenv("SANDBOX_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", runtime.client.service_client.config.target_host)
    monkeypatch.setenv("SANDBOX_TASK_QUEUE", s.task_queue)
    monkeypatch.setenv("SANDBOX_RECORDING_POLL_SECONDS", "0.5")


async def sandboxctl(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), catch_exceptions=False)


async def test_record_start_status_stop_list_get(runtime: Any, cli_env: None, tmp_path: Path) -> None:
    ws, group = ids("ws-rec")
    async with runtime.leases().hold(ws, group):
        res = await sandboxctl("record", "start", ws, group, "--codec", "vp9-webm", "--max-seconds", "30", "--json")
        assert res.exit_code == 0, res.output
        rid = json.loads(res.stdout)["recording_id"]
        for _ in range(100):
            res = await sandboxctl("record", "status", rid, "--json")
            assert res.exit_code == 0, res.output
            if json.loads(res.stdout)["state"] == "recording":
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
        res = await sandboxctl("record", "stop", rid, "--json")
        assert res.exit_code == 0, res.output
        stopped = json.loads(res.stdout)
        assert (stopped["state"], stopped["codec"], stopped["max_seconds"]) == ("available", "vp9-webm", 30)

    res = await sandboxctl("record", "list", ws, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["recording_id"], r["state"]) for r in rows] == [(rid, "available")]
    res = await sandboxctl("record", "list", ws, "--session", "other", "--json")
    assert json.loads(res.stdout) == []

    video = tmp_path / "out.webm"
    res = await sandboxctl("record", "get", rid, "-o", str(video), "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["size_bytes"] == video.stat().st_size == rows[0]["size_bytes"]
    assert ffprobe(video)["streams"][0]["codec_name"] == "vp9"


async def test_record_errors_are_typed_one_liners(runtime: Any, cli_env: None, tmp_path: Path) -> None:
    res = await sandboxctl("record", "status", "rec-nope")
    assert res.exit_code == EXIT_NOT_FOUND and "RecordingNotFound" in res.output
    res = await sandboxctl("record", "get", "rec-nope", "-o", str(tmp_path / "x.mp4"))
    assert res.exit_code == EXIT_NOT_FOUND and "RecordingNotFound" in res.output
    res = await sandboxctl("record", "start", "ws", "g", "--codec", "gif")
    assert res.exit_code == EXIT_REFUSED and "InvalidRequest" in res.output
    res = await sandboxctl("record", "status", "bad/id")
    assert res.exit_code == EXIT_REFUSED and "InvalidRequest" in res.output


async def test_desktop_screenshot_click_type_key(runtime: Any, cli_env: None, tmp_path: Path) -> None:
    ws, group = ids("ws-rec")
    async with runtime.leases().hold(ws, group):
        png = tmp_path / "screen.png"
        res = await sandboxctl("desktop", "screenshot", ws, group, "-o", str(png), "--json")
        assert res.exit_code == 0, res.output
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG") and struct.unpack(">II", data[16:24]) == (1280, 800)
        assert json.loads(res.stdout)["width"] == 1280

        res = await sandboxctl("desktop", "click", ws, group, "640", "400", "--json")
        assert res.exit_code == 0, res.output
        assert (json.loads(res.stdout)["pointer_x"], json.loads(res.stdout)["pointer_y"]) == (640, 400)
        res = await sandboxctl("desktop", "type", ws, group, "hello")
        assert res.exit_code == 0 and "typed 5 characters" in res.stdout
        res = await sandboxctl("desktop", "key", ws, group, "ctrl+a", "Return")
        assert res.exit_code == 0, res.output
        res = await sandboxctl("desktop", "key", ws, group, "$(reboot)")
        assert res.exit_code == EXIT_REFUSED and "InvalidRequest" in res.output
        res = await sandboxctl("desktop", "screenshot", ws, group, "-o", str(png), "--epoch", "999")
        assert res.exit_code == EXIT_FENCED and "StaleEpoch" in res.output
        await record_history(runtime, ws, group, "computer_use")
    # Right after desktop activity the drain publishes stream.url.rotated; the worker must still stop promptly.
    assert (await runtime.leases().drain(ws, group, wait=True)).liveness == "cold"
