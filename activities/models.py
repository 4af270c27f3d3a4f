"""Inputs and results of the activities, shared by the workflows that call them by name.

Workflows call activities by their registered name (the constants below) so that workflow
modules never import provider or database code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

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
