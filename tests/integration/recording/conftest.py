"""Helpers of the recording tests: a RecordingClient on the shared runtime, fast timers, polling."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from client.recording_client import RecordingClient
from tests.conftest import eventually
from workflows.recording_models import RecordingTimers, RecordingView

FAST = RecordingTimers(
    poll_seconds=0.5, stop_wait_seconds=8.0, activity_heartbeat_seconds=2.0, acquire_timeout_seconds=60
)


async def wait_state(
    recordings: RecordingClient, recording_id: str, *states: str, timeout: float = 30.0
) -> RecordingView:
    """Wait until the recording's query shows one of ``states``."""

    async def check() -> RecordingView | None:
        view = await recordings.describe(recording_id)
        return view if view.state in states else None

    view: RecordingView = await eventually(check, timeout, interval=0.05)
    return view


def ffprobe(path: Path) -> dict[str, Any]:
    """ffprobe's view of a video file: format duration and the first video stream."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "format=duration,format_name:stream=codec_name,width,height",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def box_tmp(runtime: Any, instance_id: str) -> Path:
    """The host directory that is /tmp inside a local box."""
    path: Path = runtime.settings.boxes_dir() / instance_id / "data" / "tmp"
    return path


@pytest.fixture
def recordings(runtime: Any) -> RecordingClient:
    return RecordingClient(runtime.client, runtime.settings)
