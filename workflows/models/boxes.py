"""Inputs and results of the activities the lease workflow runs on its box and its store rows.

Provisioning, exec, the liveness check, teardown and cleanup of boxes; capture and publication of
the workspace archives; the projection of the lease into the store and the seed a fresh run starts
from. Every model crosses the Temporal boundary as JSON (``pydantic_data_converter``); the
activities' names are :class:`workflows.activity_names.ActivityName`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, StrictInt

from sandbox.box import Envelope
from store.records import HolderBeatRecord, LeaseEventRecord, LeaseRecord
from workflows.models.lease import ArchiveRef, BackendProfile, RestoreOutcome


class ProvisionInput(BaseModel):
    """Create (or adopt, by idempotency key) a box and probe it."""

    lease_id: str
    workspace_id: str
    group_id: str
    backend: str
    epoch: StrictInt
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

    envelope: Envelope
    restore: RestoreOutcome | None = None


class BoxRef(BaseModel):
    """One box of one backend."""

    backend: str
    envelope: Envelope


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
    envelope: Envelope
    cmd: list[str]
    workdir: str | None = None
    timeout_seconds: float = 600.0
    env: dict[str, str] = Field(default_factory=dict)
    output_limit_bytes: int = 1024 * 1024
    epoch: StrictInt | None = None  # for traces only; None in histories recorded before it was sent


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
    """Which lease to look up in the store when a lease workflow starts fresh, and on which backend."""

    lease_id: str
    backend: str | None = None
    """The lease's backend, whose descriptor the seed freezes (None: no profile is read)."""


class SeedResult(BaseModel):
    """What a fresh run of a lease starts from: what a previous incarnation left in the store, and its backend."""

    epoch: StrictInt = 0
    version: int = 0
    """The projection's last transition_seq: a new run counts on from there so its writes apply."""
    found: bool = False
    backend_profile: BackendProfile | None = None
    """What the lease decides from its backend's descriptor, read now and kept in the lease's state
    (and so in its history); None in seeds recorded before, whose leases read the table as they go."""
    store_id: str | None = None
    """The fingerprint of the store this worker reads holder heartbeats from; None in seeds recorded
    before (those leases take heartbeats by update only)."""


class HolderBeatsInput(BaseModel):
    """Read the heartbeat marks of a lease's holders, forgetting marks older than ``forget_older_than_seconds``."""

    lease_id: str
    forget_older_than_seconds: float | None = None
    """Measured on the reader's clock (the workflow's may be far ahead of it, e.g. under time skipping)."""


class HolderBeats(BaseModel):
    """The marks of a lease's holders, and the reader's clock when it read them."""

    read_at: datetime
    marks: list[HolderBeatRecord] = Field(default_factory=list)


class CaptureRequest(BaseModel):
    """Capture the box's workspace (and home) into the artifact store as a ledger row ``candidate``."""

    backend: str
    envelope: Envelope
    lease_id: str
    workspace_id: str
    group_id: str
    epoch: StrictInt
    reason: Literal["drain", "periodic", "rotation"]
    only_if_changed: bool = False
    """Periodic captures skip (``ArchiveRef.unchanged``) when the workspace did not change since ``previous_sha256``."""
    previous_sha256: str | None = None


class PublishRequest(BaseModel):
    """Make a candidate the lease's current snapshot; current becomes previous, older ones delete_pending."""

    lease_id: str
    snapshot_id: str
