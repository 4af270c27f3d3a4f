"""Boundary types of the lease projection: what the lease workflow produces and the store keeps.

These pydantic models cross the Temporal boundary (the projection activities take them as their
input) and come back out of :class:`store.leases.LeaseRepository` and
:class:`store.recordings.RecordingStore`; the workflows' models import them from here, so the store
never imports a workflow. Every datetime is
timezone-aware and normalised to UTC on construction, so a record read back from either
database compares equal to the one that was written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware datetime, converted to UTC; naive datetimes are rejected."""


class HolderRecord(BaseModel):
    """One holder of a lease (a turn, a viewer, a direct attach, a recording or a process).

    Attributes:
        kind: turn | viewer | direct | recording | process.
        holder_id: Identifier of the holder, unique per (lease, kind).
        subject: Who the holder acts for (user or agent id), if known.
        acquired_at: When the holder was admitted.
        last_heartbeat_at: The holder's latest heartbeat.
    """

    model_config = ConfigDict(frozen=True)

    kind: str
    holder_id: str
    subject: str | None = None
    acquired_at: UtcDatetime
    last_heartbeat_at: UtcDatetime


class LeaseRecord(BaseModel):
    """The projected state of one lease after a transition.

    Attributes:
        lease_id: Stable id of the lease, e.g. ``lease/ws1/g1``.
        workspace_id: Workspace the sandbox group belongs to.
        group_id: Sandbox group within the workspace.
        backend: Provider backend name (local, selfhosted, modal, ...).
        os: Guest operating system.
        liveness: cold | warming | warm | draining.
        epoch: Fencing epoch of the lease.
        instance_id: Provider instance currently bound to the lease, if any.
        envelope: Provider-specific resume data, if any.
        transition_seq: Monotonic transition counter; a write with a lower or equal value is ignored.
        reason: Why the last transition happened.
        updated_at: When the last transition happened.
        holders: The holders after the transition.
    """

    model_config = ConfigDict(frozen=True)

    lease_id: str
    workspace_id: str
    group_id: str
    backend: str
    os: str = "linux"
    liveness: str
    epoch: int
    instance_id: str | None = None
    envelope: dict[str, Any] | None = None
    transition_seq: int
    reason: str
    updated_at: UtcDatetime
    holders: list[HolderRecord] = []


class LeaseEventRecord(BaseModel):
    """One liveness transition of a lease, kept as history.

    Attributes:
        lease_id: The lease the event belongs to.
        transition_seq: Transition counter of the event; unique per lease, so re-inserting is a no-op.
        from_liveness: Liveness before the transition.
        to_liveness: Liveness after the transition.
        epoch: Epoch after the transition.
        reason: Why the transition happened.
        at: When the transition happened.
    """

    model_config = ConfigDict(frozen=True)

    lease_id: str
    transition_seq: int
    from_liveness: str
    to_liveness: str
    epoch: int
    reason: str
    at: UtcDatetime


class HolderBeatRecord(BaseModel):
    """The last-seen mark of one holder: how many heartbeats it sent, and when the latest arrived.

    Attributes:
        kind: The holder's kind.
        holder_id: The holder's id.
        epoch: The epoch its latest heartbeat was for.
        beats: How many heartbeats were recorded (only ever grows); the lease compares it with the
            count it saw at the holder's previous deadline, so no two clocks need to agree.
        last_seen_at: When the latest heartbeat was recorded (the writer's clock).
    """

    model_config = ConfigDict(frozen=True)

    kind: str
    holder_id: str
    epoch: int
    beats: int
    last_seen_at: UtcDatetime


# ---------------------------------------------------------------- the recordings projection

RecordingCodec = Literal["h264-mp4", "vp9-webm"]
RecordingStateName = Literal["starting", "recording", "stopping", "finalizing", "available", "failed"]
RecordingFailureReason = Literal[
    "ffmpeg-error", "box-death", "max-bytes-exceeded", "display-unavailable", "upload-failed"
]


class RecordingRecord(BaseModel):
    """The ``recordings`` row the workflow projects; a write with a lower ``version`` never applies."""

    recording_id: str
    workspace_id: str
    session_id: str
    group_id: str
    lease_id: str
    state: RecordingStateName
    reason: RecordingFailureReason | None = None
    detail: str | None = None
    codec: RecordingCodec
    framerate: int
    max_seconds: int
    max_bytes: int
    epoch: int | None = None
    instance_id: str | None = None
    width: int | None = None
    height: int | None = None
    storage_key: str | None = None
    content_type: str
    size_bytes: int | None = None
    sha256: str | None = None
    duration_seconds: float | None = None
    version: int
    created_at: datetime
    started_at: datetime | None = None
    finalized_at: datetime | None = None
    updated_at: datetime
