"""Inputs and results of the activities, shared by the workflows that call them by name.

Workflows call activities by their registered name (the constants below) so that workflow
modules never import provider or database code.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from store.records import LeaseEventRecord, LeaseRecord
from workflows.models import (  # noqa: F401  (re-exported: activities import their models from here)
    ArchiveRef,
    BoxEnvelope,
    PlaneEndpoint,
    RestoreOutcome,
)

PROVISION_BOX = "provision_box"
TERMINATE_BOX = "terminate_box"
DISCARD_LEASE_BOXES = "discard_lease_boxes"
EXEC_IN_BOX = "exec_in_box"
CHECK_BOX = "check_box"
PROJECT_LEASE = "project_lease"
LOAD_LEASE_SEED = "load_lease_seed"


class ProvisionInput(BaseModel):
    """Create (or adopt, by idempotency key) a box and probe it."""

    lease_id: str
    workspace_id: str
    group_id: str
    backend: str
    epoch: int
    idempotency_key: str
    image: str | None = None
    os: str = "linux"
    environment: dict[str, str] = Field(default_factory=dict)
    agent_id: str | None = None
    probe_timeout_seconds: float = 60.0
    restore: list[ArchiveRef] = Field(default_factory=list)
    """Archives to restore, best first (current, then previous); the first that verifies wins."""


class ProvisionResult(BaseModel):
    """The box that passed its readiness probe."""

    envelope: BoxEnvelope
    restore: RestoreOutcome | None = None


class BoxRef(BaseModel):
    """One box of one backend."""

    backend: str
    envelope: BoxEnvelope


class DiscardInput(BaseModel):
    """Terminate every box the provider holds for a lease (cleanup after a failed warming)."""

    backend: str
    lease_id: str


class DiscardResult(BaseModel):
    """Which boxes were terminated."""

    terminated: list[str]


class ExecInput(BaseModel):
    """A command to run in a box."""

    backend: str
    envelope: BoxEnvelope
    cmd: list[str]
    workdir: str | None = None
    timeout_seconds: float = 600.0
    env: dict[str, str] = Field(default_factory=dict)
    output_limit_bytes: int = 1024 * 1024


class ExecOutput(BaseModel):
    """A command's result, output decoded as UTF-8 (invalid bytes replaced) and capped."""

    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class CheckResult(BaseModel):
    """Whether the box still exists (only a typed NotFound makes ``alive`` false)."""

    alive: bool


class ProjectionInput(BaseModel):
    """The lease state to write to the store, and the transitions since the last write."""

    record: LeaseRecord
    events: list[LeaseEventRecord] = Field(default_factory=list)


class SeedInput(BaseModel):
    """Which lease to look up in the store when a lease workflow starts fresh."""

    lease_id: str


class SeedResult(BaseModel):
    """What a previous incarnation of the lease left in the store."""

    epoch: int = 0
    version: int = 0
    """The projection's last transition_seq: a new run counts on from there so its writes apply."""
    found: bool = False


# ---------------------------------------------------------------- desktop and terminal planes

ENSURE_PLANE = "ensure_plane"
TEAR_DOWN_PLANES = "tear_down_planes"


class PlaneRequest(BaseModel):
    """Bring up (idempotently) one viewer plane of a box and its token-checking edge."""

    backend: str
    envelope: BoxEnvelope
    lease_id: str
    epoch: int
    plane: Literal["desktop", "terminal"]
    geometry: str = "1280x800"


class TearDownPlanesRequest(BaseModel):
    """Stop every plane of a box (best effort) before it is drained."""

    backend: str
    envelope: BoxEnvelope


# ---------------------------------------------------------------- workspace snapshots

CAPTURE_WORKSPACE = "capture_workspace"
PUBLISH_SNAPSHOT = "publish_snapshot"


class CaptureRequest(BaseModel):
    """Capture the box's workspace (and home) into the artifact store as a ledger row ``candidate``."""

    backend: str
    envelope: BoxEnvelope
    lease_id: str
    workspace_id: str
    group_id: str
    epoch: int
    reason: Literal["drain", "periodic", "rotation"]
    only_if_changed: bool = False
    """Periodic captures skip (``ArchiveRef.unchanged``) when the workspace did not change since ``previous_sha256``."""
    previous_sha256: str | None = None


class PublishRequest(BaseModel):
    """Make a candidate the lease's current snapshot; current becomes previous, older ones delete_pending."""

    lease_id: str
    snapshot_id: str


ENSURE_DISPLAY_STACK = "ensure_display_stack"
TEAR_DOWN_DISPLAY_STACK = "tear_down_display_stack"
ENSURE_TERMINAL_SERVER = "ensure_terminal_server"
TEAR_DOWN_TERMINAL_SERVER = "tear_down_terminal_server"
EXPOSE_STREAM_PORT = "expose_stream_port"


class DisplayStackRequest(BaseModel):
    """Bring up (idempotently) a box's desktop: Xvfb, x11vnc and the token-checking websockify edge."""

    backend: str
    envelope: BoxEnvelope
    lease_id: str
    epoch: int
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
    envelope: BoxEnvelope
    lease_id: str
    epoch: int


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
    envelope: BoxEnvelope
    plane: Literal["desktop", "terminal"]
    port: int
    resolution: str | None = None


# ---------------------------------------------------------------- computer use (screenshots and desktop input)

COMPUTER_SCREENSHOT = "computer_screenshot"
COMPUTER_DESKTOP_INPUT = "computer_desktop_input"

MAX_SCREENSHOT_BYTES = 1_500_000
"""A PNG above this is re-taken scaled down, so a screenshot always fits a Temporal payload."""
MAX_COORDINATE = 16_384
MAX_TYPED_TEXT = 10_000
MAX_ACTIONS = 100


class ScreenshotRequest(BaseModel):
    """Take a screenshot of the lease's desktop (the lease's ``screenshot`` update)."""

    epoch: int | None = None
    """If given, the lease's current epoch must equal it (fenced otherwise)."""
    geometry: str = "1280x800"
    """Desktop size, used only when the desktop is not up yet."""


class ScreenshotInput(BaseModel):
    """The ``computer_screenshot`` activity's input: the box and the lease it belongs to."""

    backend: str
    envelope: BoxEnvelope
    lease_id: str
    epoch: int
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
    epoch: int | None = None


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
    epoch: int | None = None
    geometry: str = "1280x800"


class DesktopInputInput(BaseModel):
    """The ``computer_desktop_input`` activity's input."""

    backend: str
    envelope: BoxEnvelope
    lease_id: str
    epoch: int
    actions: list[DesktopAction] = Field(min_length=1, max_length=MAX_ACTIONS)
    geometry: str = "1280x800"


class DesktopInputResult(BaseModel):
    """How many actions ran, and where the pointer ended up."""

    performed: int
    pointer_x: int
    pointer_y: int
    display: int
    epoch: int | None = None
