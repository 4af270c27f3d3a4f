"""Inputs and results of computer use: screenshots and desktop input through the lease.

The requests are the lease's ``screenshot`` and ``desktop_input`` updates; the inputs are the
activities' (``computer_screenshot``, ``computer_desktop_input``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from sandbox.box import Envelope

MAX_SCREENSHOT_BYTES = 1_500_000
"""A PNG above this is re-taken scaled down, so a screenshot always fits a Temporal payload."""
MAX_COORDINATE = 16_384
MAX_TYPED_TEXT = 10_000
MAX_ACTIONS = 100


class ScreenshotRequest(BaseModel):
    """Take a screenshot of the lease's desktop (the lease's ``screenshot`` update)."""

    epoch: StrictInt | None = None
    """If given, the lease's current epoch must equal it (fenced otherwise)."""
    geometry: str = "1280x800"
    """Desktop size, used only when the desktop is not up yet."""


class ScreenshotInput(BaseModel):
    """The ``computer_screenshot`` activity's input: the box and the lease it belongs to."""

    backend: str
    envelope: Envelope
    lease_id: str
    epoch: StrictInt
    geometry: str = "1280x800"
    max_png_bytes: int = Field(default=MAX_SCREENSHOT_BYTES, ge=10_000)


class Screenshot(BaseModel):
    """A PNG of the whole display; ``scale`` < 1 when it was shrunk to fit ``max_png_bytes``."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    png: bytes
    width: int
    height: int
    screen_width: int
    screen_height: int
    scale: float = 1.0
    display: int
    epoch: StrictInt | None = None


class _Point(BaseModel):
    x: int = Field(ge=0, le=MAX_COORDINATE)
    y: int = Field(ge=0, le=MAX_COORDINATE)


class MoveAction(_Point):
    """Move the pointer to (x, y)."""

    action: Literal["move"] = "move"


class ClickAction(BaseModel):
    """Click ``button`` at (x, y), or where the pointer is when x/y are omitted."""

    action: Literal["click"] = "click"
    x: int | None = Field(default=None, ge=0, le=MAX_COORDINATE)
    y: int | None = Field(default=None, ge=0, le=MAX_COORDINATE)
    button: Literal["left", "middle", "right"] = "left"
    count: int = Field(default=1, ge=1, le=3)


class DoubleClickAction(BaseModel):
    """Double-click ``button`` at (x, y), or where the pointer is."""

    action: Literal["double_click"] = "double_click"
    x: int | None = Field(default=None, ge=0, le=MAX_COORDINATE)
    y: int | None = Field(default=None, ge=0, le=MAX_COORDINATE)
    button: Literal["left", "middle", "right"] = "left"


class DragAction(BaseModel):
    """Press ``button`` at (x, y), move to (to_x, to_y), release."""

    action: Literal["drag"] = "drag"
    x: int = Field(ge=0, le=MAX_COORDINATE)
    y: int = Field(ge=0, le=MAX_COORDINATE)
    to_x: int = Field(ge=0, le=MAX_COORDINATE)
    to_y: int = Field(ge=0, le=MAX_COORDINATE)
    button: Literal["left", "middle", "right"] = "left"


class TypeAction(BaseModel):
    """Type ``text`` as keystrokes into the focused window."""

    action: Literal["type"] = "type"
    text: str = Field(min_length=1, max_length=MAX_TYPED_TEXT)


class KeyAction(BaseModel):
    """Press key chords in order, e.g. ``ctrl+a``, ``Return``, ``ctrl+shift+t`` (X keysym names joined by +)."""

    action: Literal["key"] = "key"
    keys: list[str] = Field(min_length=1, max_length=20)

    @field_validator("keys")
    @classmethod
    def _chords(cls, keys: list[str]) -> list[str]:
        for chord in keys:
            if not _KEY_CHORD_RE.fullmatch(chord):
                raise ValueError(f"{chord!r} is not a key chord such as ctrl+a, Return or ctrl+shift+t")
        return keys


class ScrollAction(BaseModel):
    """Scroll ``amount`` notches in ``direction`` at (x, y), or where the pointer is."""

    action: Literal["scroll"] = "scroll"
    direction: Literal["up", "down", "left", "right"] = "down"
    amount: int = Field(default=3, ge=1, le=50)
    x: int | None = Field(default=None, ge=0, le=MAX_COORDINATE)
    y: int | None = Field(default=None, ge=0, le=MAX_COORDINATE)


_KEY_CHORD_RE = re.compile(r"^[A-Za-z0-9_]{1,32}(\+[A-Za-z0-9_]{1,32}){0,5}$")

DesktopAction = Annotated[
    MoveAction | ClickAction | DoubleClickAction | DragAction | TypeAction | KeyAction | ScrollAction,
    Field(discriminator="action"),
]


class DesktopInputRequest(BaseModel):
    """Drive the lease's desktop with pointer and keyboard actions, in order (``desktop_input`` update)."""

    actions: list[DesktopAction] = Field(min_length=1, max_length=MAX_ACTIONS)
    epoch: StrictInt | None = None
    geometry: str = "1280x800"


class DesktopInputInput(BaseModel):
    """The ``computer_desktop_input`` activity's input."""

    backend: str
    envelope: Envelope
    lease_id: str
    epoch: StrictInt
    actions: list[DesktopAction] = Field(min_length=1, max_length=MAX_ACTIONS)
    geometry: str = "1280x800"


class DesktopInputResult(BaseModel):
    """How many actions ran, and where the pointer ended up."""

    performed: int
    pointer_x: int
    pointer_y: int
    display: int
    epoch: StrictInt | None = None
