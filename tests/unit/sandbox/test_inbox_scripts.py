from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from sandbox.box import ExecResult
from sandbox.inbox_scripts import (
    SCRIPT_NAMES,
    InboxScripts,
    desktop_stage,
    host_edge_environment,
    missing_tools,
    parse_desktop_up,
    parse_status,
    parse_terminal_up,
    script_path,
    terminal_stage,
)


def test_desktop_marker_is_parsed() -> None:
    up = parse_desktop_up("noise\nSANDBOX_DESKTOP_UP port=40123 geometry=1280x800 dpi=96 display=:3\n")
    assert up is not None
    assert (up.port, up.geometry, up.dpi, up.display, up.already) == (40123, "1280x800", 96, 3, False)
    again = parse_desktop_up("SANDBOX_DESKTOP_UP port=6080 geometry=800x600 dpi=72 display=:0 (already)")
    assert again is not None and again.already
    assert parse_desktop_up("SANDBOX_DESKTOP_UP port=99999 geometry=1x1 dpi=1 display=:0") is None
    assert parse_desktop_up("") is None


def test_terminal_marker_and_status_are_parsed() -> None:
    up = parse_terminal_up("SANDBOX_TERMINAL_UP port=7681 (already)\n")
    assert up is not None and up.port == 7681 and up.already
    status = parse_status("SANDBOX_DESKTOP_STATUS xvfb=up x11vnc=down websockify=up")
    assert status is not None and not status.up and status.parts["x11vnc"] is False
    assert missing_tools("SANDBOX_TERMINAL_UNAVAILABLE missing=ttyd") == ["ttyd"]
    assert missing_tools("nothing") == []


@pytest.mark.parametrize(
    ("code", "output", "stage"),
    [
        (11, "", "xvfb"),
        (12, "", "x11vnc"),
        (13, "", "websockify"),
        (15, "", "lock"),
        (124, "", "timeout"),
        (1, "x11vnc failed on :3", "x11vnc"),
        (1, "SANDBOX_DESKTOP_LOCK_TIMEOUT", "lock"),
        (1, "?", "unknown"),
    ],
)
def test_desktop_stages(code: int, output: str, stage: str) -> None:
    assert desktop_stage(code, output) == stage


def test_terminal_stages() -> None:
    assert terminal_stage(14) == "ttyd"
    assert terminal_stage(1, "ttyd failed to come up on 7681") == "ttyd"
    assert terminal_stage(3) == "unknown"


def test_scripts_ship_with_the_package_and_the_host_environment_finds_the_edge() -> None:
    for name in SCRIPT_NAMES:
        assert script_path(name).read_text().startswith("#!/usr/bin/env bash")
    env = host_edge_environment()
    assert Path(env["SANDBOX_EDGE_PYTHON"]).is_file()
    assert any((Path(p) / "daemons" / "edge").is_dir() for p in env["SANDBOX_EDGE_PYTHONPATH"].split(":"))
    assert InboxScripts.on_host().command("desktop-up", "--status")[0] == "bash"


class RecordingSession:
    """A box that stores files written through `sh -c 'cat > ...'`."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.calls = 0

    @property
    def instance_id(self) -> str:
        return "box-fake"

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        self.calls += 1
        if cmd[0] == "test":
            return ExecResult(0 if cmd[2] in self.files else 1)
        if cmd[0] == "touch":
            self.files[cmd[1]] = b""
            return ExecResult(0)
        directory, name = cmd[-2], cmd[-1]
        self.files[f"{directory}/{name}"] = stdin or b""
        return ExecResult(0)


async def test_install_copies_each_script_once() -> None:
    session = RecordingSession()
    scripts = await InboxScripts.install(session)  # type: ignore[arg-type]
    for name in SCRIPT_NAMES:
        assert session.files[f"{scripts.directory}/{name}"] == script_path(name).read_bytes()
    calls = session.calls
    again = await InboxScripts.install(session)  # type: ignore[arg-type]
    assert again.directory == scripts.directory and session.calls == calls + 1
