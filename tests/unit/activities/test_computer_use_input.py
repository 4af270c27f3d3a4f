"""Pure parts of computer use: the xdotool script, PNG sizes, action validation, the policy cell."""

from __future__ import annotations

import base64
import struct
import subprocess
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from activities.computer_use import computer_use_policy, input_script, png_size
from activities.models import (
    ClickAction,
    DesktopInputRequest,
    DragAction,
    KeyAction,
    MoveAction,
    ScrollAction,
    TypeAction,
)
from sandbox.capabilities import negotiate_capabilities
from sandbox.errors import ComputerUseError
from sandbox.settings import Settings


def _xdotool_calls(script: str, args: list[str]) -> list[list[str]]:
    """Run the generated script with a fake xdotool that prints its argv, one call per line (NUL-separated)."""
    fake = (
        'xdotool() { if [ "$1" = getdisplaygeometry ]; then echo "1280 800"; return; fi; '
        'if [ "$1" = getmouselocation ]; then echo X=1; echo Y=2; return; fi; '
        'echo CALL $#; for a in "$@"; do printf \'%s\' "$a" | base64 -w0; echo; done; }\n'
    )
    body = script.replace("TOOLS='xdotool'", "TOOLS=''", 1)
    edge_setup = (
        'export SANDBOX_EDGE_DIR=$(mktemp -d); mkdir -p "$SANDBOX_EDGE_DIR/desktop"; '
        'echo 7 >"$SANDBOX_EDGE_DIR/desktop/display"\n'
    )
    out = subprocess.run(
        ["bash", "-c", edge_setup + fake + body, "input", *args], capture_output=True, check=True, timeout=10
    ).stdout
    calls = []
    lines = iter(out.decode().split("\n"))
    for line in lines:
        if line.startswith("CALL "):
            calls.append([base64.b64decode(next(lines)).decode() for _ in range(int(line.split()[1]))])
    return calls


def test_actions_become_xdotool_calls_in_order() -> None:
    script, args = input_script(
        [
            MoveAction(x=1, y=2),
            ClickAction(x=3, y=4, button="right", count=2),
            ClickAction(),
            DragAction(x=5, y=6, to_x=7, to_y=8),
            ScrollAction(direction="up", amount=4),
            KeyAction(keys=["ctrl+a", "Return"]),
            TypeAction(text="hi"),
        ]
    )
    assert _xdotool_calls(script, args) == [
        ["mousemove", "1", "2"],
        ["mousemove", "3", "4", "click", "--repeat", "2", "3"],
        ["click", "--repeat", "1", "1"],
        ["mousemove", "5", "6", "mousedown", "1"],
        ["mousemove", "7", "8"],
        ["mouseup", "1"],
        ["click", "--repeat", "4", "4"],
        ["key", "--clearmodifiers", "--", "ctrl+a", "Return"],
        ["type", "--clearmodifiers", "--delay", "8", "--", "hi"],
    ]


@settings(max_examples=40, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=60)
)
def test_typed_text_reaches_xdotool_verbatim_never_as_shell(text: str) -> None:
    script, args = input_script([TypeAction(text=text), TypeAction(text=text)])
    # The script does not depend on the text: the text is only ever an argument.
    assert script == input_script([TypeAction(text="x"), TypeAction(text="y")])[0]
    calls = _xdotool_calls(script, args)
    assert [c[-1] for c in calls] == [text, text]


@pytest.mark.parametrize("chord", ["ctrl+a", "Return", "ctrl+shift+t", "KP_Enter", "super"])
def test_key_chords_are_keysym_names_joined_by_plus(chord: str) -> None:
    assert KeyAction(keys=[chord]).keys == [chord]


@pytest.mark.parametrize("chord", ["", "ctrl+", "+a", "a b", "$(reboot)", "ctrl;a", "a+b+c+d+e+f+g"])
def test_malformed_key_chords_are_refused(chord: str) -> None:
    with pytest.raises(ValidationError):
        KeyAction(keys=[chord])


def test_bad_actions_are_refused_before_anything_runs() -> None:
    bad: dict[str, Any]
    for bad in (
        {"actions": []},
        {"actions": [{"action": "teleport"}]},
        {"actions": [{"action": "move", "x": -1, "y": 0}]},
        {"actions": [{"action": "click", "button": "fourth"}]},
        {"actions": [{"action": "type", "text": ""}]},
        {"actions": [{"action": "scroll", "amount": 0}]},
    ):
        with pytest.raises(ValidationError):
            DesktopInputRequest.model_validate(bad)
    ok = DesktopInputRequest.model_validate({"actions": [{"action": "double_click", "x": 1, "y": 2}]})
    assert ok.actions[0].action == "double_click"


def _png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_png_size_reads_the_header_and_refuses_other_data() -> None:
    assert png_size(_png(1280, 800)) == (1280, 800)
    for bad in (b"", b"GIF89a" + b"\0" * 30, _png(1, 1)[:20]):
        with pytest.raises(ComputerUseError):
            png_size(bad)


def test_the_capability_cell_reflects_the_policy() -> None:
    ctx = {"session_id": "s", "backend": "modal", "os": "linux", "liveness": "warm", "lease_epoch": 1}
    for policy, available, read_only in (
        ({}, True, False),
        ({"computer_use_read_only": True}, True, True),
        ({"computer_use_enabled": False}, False, False),
    ):
        fields = computer_use_policy(Settings().model_copy(update=policy))
        cell = negotiate_capabilities({**ctx, "desktop_enabled": True, **fields}).computer_use
        assert (cell.available, cell.read_only) == (available, read_only)
