"""Inputs and results of the desktop and terminal plane activities.

The lease workflow brings a plane up for a viewer (``ensure_plane``) and tears every plane down
before its box goes (``tear_down_planes``); the recording workflow ensures the desktop itself
(``ensure_display_stack``). The names are :class:`workflows.activity_names.ActivityName`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, StrictInt

from sandbox.box import Envelope


class PlaneRequest(BaseModel):
    """Bring up (idempotently) one viewer plane of a box and its token-checking edge."""

    backend: str
    envelope: Envelope
    lease_id: str
    epoch: StrictInt
    plane: Literal["desktop", "terminal"]
    geometry: str = "1280x800"


class TearDownPlanesRequest(BaseModel):
    """Stop every plane of a box (best effort) before it is drained."""

    backend: str
    envelope: Envelope


class DisplayStackRequest(BaseModel):
    """Bring up (idempotently) a box's desktop: Xvfb, x11vnc and the token-checking websockify edge."""

    backend: str
    envelope: Envelope
    lease_id: str
    epoch: StrictInt
    geometry: str = "1280x800"
    dpi: int = 96


class DisplayStackResult(BaseModel):
    """The desktop that is up: its edge port inside the box, geometry and X display number."""

    port: int
    geometry: str
    dpi: int
    display: int
    already_up: bool
    marker: str


class TerminalServerRequest(BaseModel):
    """Bring up (idempotently) a box's terminal: ttyd behind the token-checking edge."""

    backend: str
    envelope: Envelope
    lease_id: str
    epoch: StrictInt


class TerminalServerResult(BaseModel):
    """The terminal edge port inside the box, or ``available=False`` with a reason (e.g. no ttyd)."""

    available: bool
    port: int | None = None
    already_up: bool = False
    reason: str | None = None
    marker: str | None = None


class ExposeStreamPortRequest(BaseModel):
    """Where a viewer outside the box reaches a plane's edge port."""

    backend: str
    envelope: Envelope
    plane: Literal["desktop", "terminal"]
    port: int
    resolution: str | None = None
