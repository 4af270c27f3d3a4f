"""The lease workflow's input, state, updates, signals and query (and the ids they carry).

Everything here is carried by ``pydantic_data_converter`` as JSON, so a scheduler written in
another language can call the workflow. One model per workflow input, update, signal and query,
so fields with defaults can be added later without breaking running workflows.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, Field, StrictInt

from sandbox.box import Envelope

Liveness = Literal["cold", "warming", "warm", "draining"]
HolderKind = Literal["turn", "viewer", "direct", "recording", "process"]
Role = Literal["spawner", "attached", "rearmed"]

HOLDER_KINDS: tuple[str, ...] = ("turn", "viewer", "direct", "recording", "process")
LIVENESS_VALUES: tuple[str, ...] = ("cold", "warming", "warm", "draining")

MAX_ID_LENGTH = 128
MAX_HOLDER_ID_LENGTH = 200
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
"""Workspace and group ids: they become part of the workflow id ``lease/<workspace>/<group>``."""

TRANSITIONS_KEPT = 20
MAX_EXEC_TIMEOUT_SECONDS: Final = 24 * 3600
"""The longest timeout an ``exec`` may ask for (seconds)."""

MAX_UPDATE_INPUT_BYTES: Final = 512 * 1024
"""The largest input (its JSON, in bytes) that any update of the lease accepts, and that a client sends.

Temporal writes an accepted update's input into the lease's history, and an ``exec`` writes it
again as its activity's input in the same workflow task. Past the server's payload limit (2 MiB by
default) that task fails with PAYLOADS_TOO_LARGE and is retried again and again, so the lease stops
answering. 512 KiB (Temporal's own warning threshold) keeps every such task well inside the limit;
bigger data belongs in a file in the box (``sandboxctl fs put``), passed to the command by its path.
The client refuses a bigger input before sending it and each update's validator refuses it too, as
an ``InvalidRequest`` that names this limit. The lease spec (image, environment) is bounded alike.

No validator can refuse an input over the server's payload limit: Temporal's rejection of an update
carries the rejected request, so the worker cannot send even that back (the SDK fails the task
instead, until the server gives the update up). The server refuses such an update at admission
instead, configured as :mod:`workflows.server_settings` says.
"""


def oversized_update_input(what: str, arg: BaseModel) -> str | None:
    """Why ``arg`` (the input of the update ``what``) is refused for its size, or None when it fits.

    The size is that of the JSON the data converter sends (UTF-8), measured the same way on both
    sides of the boundary, so the client's check and the validator's agree.
    """
    size = len(arg.model_dump_json().encode())
    if size <= MAX_UPDATE_INPUT_BYTES:
        return None
    return (
        f"the {what} input is {size} bytes, over the limit of {MAX_UPDATE_INPUT_BYTES} bytes "
        f"(MAX_UPDATE_INPUT_BYTES) on what one lease update carries; put large data in a file in the box "
        "(sandboxctl fs put) and pass its path instead"
    )


def lease_workflow_id(workspace_id: str, group_id: str) -> str:
    """The workflow id of the lease of one sandbox group."""
    return f"lease/{workspace_id}/{group_id}"


class LeaseTimers(BaseModel):
    """Every duration the lease workflow uses (seconds); settings fill them, tests shrink them."""

    holder_ttl_seconds: float = 90.0
    warming_ttl_seconds: float = 120.0
    idle_grace_seconds: float = 900.0
    probe_timeout_seconds: float = 60.0
    exec_timeout_seconds: float = 600.0
    activity_heartbeat_seconds: float = 10.0
    snapshot_interval_seconds: float = 900.0
    """Periodic capture while held (only if the workspace changed); 0 disables it."""
    capture_timeout_seconds: float = 600.0
    teardown_retry_seconds: float = 30.0
    """After a failed capture or terminate the box keeps running; teardown is tried again after this."""
    rotation_lead_seconds: float = 3600.0
    hard_lifetime_seconds: float | None = None
    """Overrides the provider's hard lifetime (from its descriptor); None means use the descriptor's."""
    continue_as_new_after_transitions: int = 500
    continue_as_new_after_updates: int = 1000

    def violations(self) -> list[tuple[str, str]]:
        """The timers out of their bounds, as ``(field, rule)`` pairs; empty when all are valid.

        The bounds are checked here rather than declared on the fields: a timer out of bounds in a
        workflow's input must be refused by an update validator (a typed error), not fail the
        decoding of every workflow task. ``0`` is allowed where it means "none" (idle grace,
        snapshot interval, rotation lead).
        """
        found: list[tuple[str, str]] = []
        for name, rule in _TIMER_RULES.items():
            value = getattr(self, name)
            if value is None and name == "hard_lifetime_seconds":
                continue
            low, strict = rule
            if isinstance(value, bool) or not math.isfinite(value) or value < low or (strict and value == low):
                found.append((name, f"a finite number {'>' if strict else '>='} {low:g}"))
        return found


_TIMER_RULES: Final[dict[str, tuple[float, bool]]] = {
    # field: (lower bound, whether the bound itself is excluded)
    "holder_ttl_seconds": (0, True),
    "warming_ttl_seconds": (0, True),
    "idle_grace_seconds": (0, False),
    "probe_timeout_seconds": (0, True),
    "exec_timeout_seconds": (0, True),
    "activity_heartbeat_seconds": (0, True),
    "snapshot_interval_seconds": (0, False),
    "capture_timeout_seconds": (0, True),
    "teardown_retry_seconds": (0, True),
    "rotation_lead_seconds": (0, False),
    "hard_lifetime_seconds": (0, True),
    "continue_as_new_after_transitions": (1, False),
    "continue_as_new_after_updates": (1, False),
}


class LeaseSpec(BaseModel):
    """What the lease is for: fixed for the life of the lease workflow."""

    workspace_id: str
    group_id: str
    backend: str = "local"
    os: str = "linux"
    image: str | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    agent_id: str | None = None
    """For ``selfhosted``: the agent of the user's machine this lease runs on."""
    desktop_enabled: bool = False
    terminal_enabled: bool = True
    snapshots_enabled: bool = False
    """Capture the workspace on drain (and periodically), restore it into the next box."""
    timers: LeaseTimers = Field(default_factory=LeaseTimers)

    @property
    def lease_id(self) -> str:
        """The workflow id, ``lease/<workspace>/<group>``."""
        return lease_workflow_id(self.workspace_id, self.group_id)


class Holder(BaseModel):
    """Someone keeping the box alive: an agent turn, a viewer, a direct API call, ..."""

    kind: HolderKind
    holder_id: str
    subject: str | None = None
    acquired_at: datetime
    last_heartbeat_at: datetime
    """When the lease last knew this holder alive (its acquire, a heartbeat update, or a deadline
    check that found new heartbeats in the store); the holder's deadline is this plus the TTL."""
    beats: int = 0
    """The holder's beat count in the store as of the last deadline check (see ``HolderBeatRecord``)."""


class Transition(BaseModel):
    """One liveness change, kept in the workflow state and projected to ``lease_events``."""

    seq: int
    from_liveness: Liveness
    to_liveness: Liveness
    epoch: StrictInt
    reason: str
    at: datetime


class ArchiveRef(BaseModel):
    """A stored workspace archive: enough to verify and restore it without the ledger."""

    snapshot_id: str
    key: str
    sha256: str
    size_bytes: int
    kind: Literal["tar", "tar+zstd", "native"] = "tar"
    epoch: StrictInt
    unchanged: bool = False


class RestoreOutcome(BaseModel):
    """How provisioning hydrated the new box from the lease's archives."""

    restored_from: str | None = None
    """snapshot_id of the archive restored, or None when the box started empty."""
    degraded: bool = False
    """True when archives existed but none verified (the box started without the workspace)."""
    notes: list[str] = Field(default_factory=list)


class BackendProfile(BaseModel):
    """What a lease decides from its backend's capability descriptor, frozen when the lease starts.

    The ``load_lease_seed`` activity reads it once, when a lease starts, so it is written into the
    history, kept in :class:`LeaseState` and carried across continue-as-new: a replay, or a run
    after the descriptor table changed, decides as the lease did when it started.
    """

    backend: str
    keeps_snapshots: bool = False
    """The backend keeps workspace archives (its descriptor's ``snapshot.kind`` is not ``none``)."""
    hard_lifetime_seconds: float | None = None
    """The provider ends a box this long after it starts (descriptor ``lifetime.hard_lifetime_ms``); None: never."""


class LeaseState(BaseModel):
    """All mutable state of a lease; carried whole across continue-as-new."""

    liveness: Liveness = "cold"
    epoch: StrictInt = 0
    envelope: Envelope | None = None
    holders: list[Holder] = Field(default_factory=list)
    transitions: list[Transition] = Field(default_factory=list)
    version: int = 0
    """Bumped on every change worth projecting; the store ignores writes with an older version."""
    drain_deadline: datetime | None = None
    drain_requested: str | None = None
    hold_until: datetime | None = None
    hold_reason: str | None = None
    stop_requested: bool = False
    last_error: str | None = None
    seeded: bool = False
    planes: list[str] = Field(default_factory=list)
    """Viewer planes brought up on the current box (torn down before it is terminated)."""
    archive_current: ArchiveRef | None = None
    archive_previous: ArchiveRef | None = None
    last_capture_at: datetime | None = None
    warm_since: datetime | None = None
    rotation_due_at: datetime | None = None
    rotation_requested: bool = False
    restore_status: str | None = None
    """How the current box was hydrated: ``empty``, ``restored``, ``fell-back`` or ``degraded``."""
    backend_profile: BackendProfile | None = None
    """Frozen from the descriptor by the seed when the lease started; None for leases seeded before
    (their seed result has none), which read the descriptor table as they go, as they always did."""
    store_id: str | None = None
    """The fingerprint of the store the lease's worker reads heartbeats from (from the seed). None
    for leases seeded before heartbeats left the history: their holders heartbeat by update."""


class LeaseInput(BaseModel):
    """Workflow input: the spec, plus the state carried over by continue-as-new."""

    spec: LeaseSpec
    state: LeaseState | None = None


class AcquireRequest(BaseModel):
    """Become a holder of the lease and wait until its box is warm."""

    kind: HolderKind = "turn"
    holder_id: str
    subject: str | None = None
    expected_epoch: StrictInt | None = None
    backend: str | None = None
    """If given, must match the lease's backend (a lease never changes backend)."""


class LeaseGrant(BaseModel):
    """What an acquirer gets: the epoch to fence with and where the box is."""

    lease_id: str
    epoch: StrictInt
    role: Role
    liveness: Liveness
    backend: str
    backend_id: str
    instance_id: str
    envelope: Envelope
    holder_id: str
    kind: HolderKind


class PlaneEndpoint(BaseModel):
    """Where a viewer connects to a plane's edge (the token travels in-band, never here)."""

    plane: Literal["desktop", "terminal"]
    url: str
    host: str
    port: int
    tls: bool = False
    transport: str
    resolution: str | None = None


class AttachViewerRequest(BaseModel):
    """Watch the box: hold the lease as a viewer and bring up one plane's edge.

    ``mode`` is what the viewer's stream token will allow: ``view`` (the default, and what every
    request recorded before modes existed means) sees the plane only; ``control`` may also type
    and move the pointer. The edge enforces it.
    """

    viewer_id: str
    subject: str | None = None
    plane: Literal["desktop", "terminal"] = "desktop"
    geometry: str = "1280x800"
    mode: Literal["view", "control"] = "view"


class ViewerAttachment(BaseModel):
    """The viewer's grant, where its plane listens and the mode granted; the client mints the stream token."""

    grant: LeaseGrant
    endpoint: PlaneEndpoint
    mode: Literal["view", "control"] = "view"


class HolderRef(BaseModel):
    """Names one holder of the lease."""

    kind: HolderKind = "turn"
    holder_id: str


class HeartbeatRequest(BaseModel):
    """Keep a holder alive; fenced when the epoch is not the lease's current one."""

    kind: HolderKind = "turn"
    holder_id: str
    epoch: StrictInt


def stale_heartbeat_message(epoch: int, current: int) -> str:
    """The words of a heartbeat's ``StaleEpoch`` refusal (the lease's and the client's own, alike)."""
    return f"heartbeat for epoch {epoch} but the lease is at epoch {current}; your box was replaced, acquire again"


class HeartbeatResult(BaseModel):
    """The lease's answer to a heartbeat."""

    alive: bool
    epoch: StrictInt
    liveness: Liveness
    expires_at: datetime


class HeartbeatCheck(BaseModel):
    """The ``heartbeat_check`` query's answer: whether a heartbeat would be accepted, and where to record it.

    ``refusal``/``message`` are the typed error a heartbeat update would be refused with (the same
    type and words), or None. ``store_id`` names the store whose ``sandbox_holder_heartbeats`` the
    lease reads at the holder's deadline; None: heartbeat by update (the lease predates the store path).
    """

    refusal: str | None = None
    message: str | None = None
    epoch: int
    liveness: Liveness
    expires_at: datetime | None = None
    """The deadline at which the lease will next look at this holder's heartbeats."""
    holder_ttl_seconds: float
    store_id: str | None = None


class ReleaseResult(BaseModel):
    """The lease's answer to a release."""

    released: bool
    liveness: Liveness
    remaining_holders: int


class DrainRequest(BaseModel):
    """Operator drain: drop every holder and tear the box down now."""

    reason: str = "operator"
    wait: bool = False


class ExecRequest(BaseModel):
    """Run a command in the warm box (audited in the workflow history)."""

    cmd: list[str]
    workdir: str | None = None
    timeout_seconds: float | None = None
    env: dict[str, str] = Field(default_factory=dict)
    epoch: StrictInt | None = None


class ExecOutcome(BaseModel):
    """A command's result; output beyond the cap is cut and flagged."""

    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    epoch: StrictInt


class BoxLostReport(BaseModel):
    """An observer saw a typed NotFound for the box of this epoch."""

    epoch: StrictInt
    instance_id: str


class BoxLostResult(BaseModel):
    """Whether the lease agreed the box is gone (it checks with the provider first)."""

    lost: bool
    epoch: StrictInt
    liveness: Liveness


class HoldRequest(BaseModel):
    """Operator hold: no automatic teardown until ``until``."""

    until: datetime
    reason: str = "operator"


class HolderView(BaseModel):
    """A holder as shown by ``describe``."""

    kind: HolderKind
    holder_id: str
    subject: str | None
    acquired_at: datetime
    last_heartbeat_at: datetime
    expires_at: datetime


class LeaseView(BaseModel):
    """The ``describe`` query result: everything an operator wants to see."""

    lease_id: str
    workspace_id: str
    group_id: str
    backend: str
    os: str
    liveness: Liveness
    epoch: StrictInt
    instance_id: str | None
    backend_id: str | None
    envelope: Envelope | None
    holders: list[HolderView]
    transitions: list[Transition]
    drain_deadline: datetime | None
    hold_until: datetime | None
    hold_reason: str | None
    stop_requested: bool
    last_error: str | None
    version: int
    archive_current: ArchiveRef | None = None
    archive_previous: ArchiveRef | None = None
    restore_status: str | None = None
    rotation_due_at: datetime | None = None
    backend_profile: BackendProfile | None = None
    agent_id: str | None = None
    """For ``selfhosted``: the agent of the machine the lease runs on (as its spec names it)."""
