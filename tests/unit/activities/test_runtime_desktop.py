"""``runtime_desktop``: what the worker tells negotiation about desktops in local boxes, from the host's tools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from activities.planes import LOCAL_BOX_PATH, runtime_desktop
from sandbox.capabilities import RuntimeDesktop, negotiate_capabilities

ALL_TOOLS = ("Xvfb", "x11vnc", "xauth", "setsid", "flock", "ffmpeg", "ffprobe", "xdotool", "import")


def bin_dir(tmp_path: Path, tools: tuple[str, ...]) -> str:
    for tool in tools:
        exe = tmp_path / tool
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return str(tmp_path)


def test_every_tool_present_offers_everything(tmp_path: Path) -> None:
    assert runtime_desktop("local", path=bin_dir(tmp_path, ALL_TOOLS)) == RuntimeDesktop(
        display=True, recording=True, computer_use=True
    )


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("ffmpeg", RuntimeDesktop(display=True, recording=False, computer_use=True)),
        ("xdotool", RuntimeDesktop(display=True, recording=True, computer_use=False)),
        ("Xvfb", RuntimeDesktop(display=False, recording=False, computer_use=False)),
        ("x11vnc", RuntimeDesktop(display=False, recording=False, computer_use=False)),
    ],
)
def test_a_missing_tool_takes_away_what_needs_it(tmp_path: Path, missing: str, expected: RuntimeDesktop) -> None:
    tools = tuple(t for t in ALL_TOOLS if t != missing)
    assert runtime_desktop("local", path=bin_dir(tmp_path, tools)) == expected


def test_a_non_executable_file_is_not_a_tool(tmp_path: Path) -> None:
    path = bin_dir(tmp_path, ALL_TOOLS)
    (tmp_path / "Xvfb").chmod(0o644)
    result = runtime_desktop("local", path=path)
    assert result is not None and not result.display


@pytest.mark.parametrize("backend", ["modal", "none", "selfhosted", "daytona"])
def test_other_backends_are_left_to_their_descriptors(tmp_path: Path, backend: str) -> None:
    assert runtime_desktop(backend, path=bin_dir(tmp_path, ALL_TOOLS)) is None


@pytest.mark.skipif(
    any(shutil.which(t, path=LOCAL_BOX_PATH) is None for t in ALL_TOOLS), reason="host has no desktop stack"
)
def test_this_host_negotiates_computer_use_and_recording_for_local() -> None:
    # The worker's own view of this host (which runs the recording integration tests) turns the cells on.
    doc = negotiate_capabilities(
        {
            "session_id": "s",
            "backend": "local",
            "os": "linux",
            "liveness": "warm",
            "lease_epoch": 1,
            "desktop_enabled": True,
            "runtime_desktop": runtime_desktop("local"),
        }
    )
    assert doc.computer_use.available and doc.recording.available and doc.desktop_stream.reason is None
