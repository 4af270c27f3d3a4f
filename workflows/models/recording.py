"""Pydantic models of the recording workflow: its input, updates, query, activities and projection.

Everything here crosses the Temporal boundary as JSON (``pydantic_data_converter``), so a scheduler
in another language can start, stop and watch a recording. The module is pure (no I/O), so the
workflow, the activities, the store and the client all import it.

A recording's life: ``starting → recording → stopping → finalizing → available | failed(reason)``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, Field, StrictInt, field_validator

from sandbox.box import Envelope
from store.records import RecordingCodec, RecordingFailureReason, RecordingRecord, RecordingStateName
from workflows.models.lease import ID_PATTERN, MAX_ID_LENGTH

StopCause = Literal["requested", "max-duration", "ffmpeg-exited", "max-bytes", "box-lost"]

RECORDING_CODECS: Final[tuple[str, ...]] = ("h264-mp4", "vp9-webm")
RECORDING_STATES: Final[tuple[str, ...]] = (
    "starting",
    "recording",
    "stopping",
    "finalizing",
    "available",
    "failed",
)
TERMINAL_STATES: Final[frozenset[str]] = frozenset({"available", "failed"})
FAILURE_REASONS: Final[tuple[str, ...]] = (
    "ffmpeg-error",
    "box-death",
    "max-bytes-exceeded",
    "display-unavailable",
    "upload-failed",
)

DEFAULT_FRAMERATE: Final = 15
DEFAULT_MAX_SECONDS: Final = 600
DEFAULT_MAX_BYTES: Final = 268_435_456
"""256 MiB: a box file above this is never uploaded (``max-bytes-exceeded``), it stays on the box."""
MAX_MAX_SECONDS: Final = 14_400
DEFAULT_GEOMETRY: Final = "1280x800"

RECORDING_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Recording ids become a workflow id, a file name in the box and an artifact key segment."""

_EXTENSIONS: Final = {"h264-mp4": "mp4", "vp9-webm": "webm"}
_CONTENT_TYPES: Final = {"h264-mp4": "video/mp4", "vp9-webm": "video/webm"}


def recording_workflow_id(recording_id: str) -> str:
    """The workflow id of one recording, ``recording/<recording_id>``."""
    return f"recording/{recording_id}"


def codec_extension(codec: str) -> str:
    """The file extension of a codec: ``mp4`` or ``webm``."""
    return _EXTENSIONS[codec]


def codec_content_type(codec: str) -> str:
    """The MIME type of a codec: ``video/mp4`` or ``video/webm``."""
    return _CONTENT_TYPES[codec]


def recording_storage_key(workspace_id: str, session_id: str, recording_id: str, codec: str) -> str:
    """The artifact key of a finished recording: ``recordings/<ws>/<session>/<id>.<mp4|webm>``."""
    return f"recordings/{workspace_id}/{session_id}/{recording_id}.{codec_extension(codec)}"


def box_file_name(recording_id: str, codec: str) -> str:
    """The video's file name in the box's temp directory (outside the workspace): ``og-rec-<id>.<ext>``."""
    return f"og-rec-{recording_id}.{codec_extension(codec)}"


def _check_id(name: str, value: str) -> str:
    if not value or len(value) > MAX_ID_LENGTH or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{name} {value!r} must be 1..{MAX_ID_LENGTH} letters, digits or . _ : - (starting alnum)")
    return value


class RecordingTimers(BaseModel):
    """Durations of the recording workflow (seconds); settings fill them, tests shrink them."""

    poll_seconds: float = Field(default=5.0, gt=0)
    """How often ffmpeg is checked (alive, size) and the lease holder heartbeated."""
    stop_wait_seconds: float = Field(default=8.0, gt=0)
    """Bounded wait for ffmpeg to write its trailer after SIGINT (then SIGKILL)."""
    acquire_timeout_seconds: float = Field(default=180.0, gt=0)
    """How long holding the lease may take (a cold lease creates its box first)."""
    upload_timeout_seconds: float = Field(default=900.0, gt=0)
    upload_attempts: int = Field(default=4, ge=1)
    """Upload tries before ``upload-failed`` (the box file is kept for a later retry)."""
    activity_heartbeat_seconds: float = Field(default=10.0, gt=0)


class RecordingRequest(BaseModel):
    """Start a recording of a lease's desktop (the lease's ``start_recording`` update, or the client).

    Attributes:
        recording_id: Id to use; None lets the starter pick one (``rec-<uuid>``).
        session_id: Session the video belongs to (its storage key); None means the group id.
        subject: Who asked for it (kept on the recording holder).
        codec: ``h264-mp4`` (default) or ``vp9-webm``.
        framerate: Frames per second (1..60).
        max_seconds: Hard ceiling (ffmpeg ``-t`` and the workflow's timer).
        max_bytes: Files above this are never uploaded (``max-bytes-exceeded``).
        geometry: Desktop size, used only when the desktop is not up yet.
        expected_epoch: Record only the box of this lease epoch (fenced otherwise).
    """

    recording_id: str | None = None
    session_id: str | None = None
    subject: str | None = None
    codec: RecordingCodec = "h264-mp4"
    framerate: int = Field(default=DEFAULT_FRAMERATE, ge=1, le=60)
    max_seconds: int = Field(default=DEFAULT_MAX_SECONDS, ge=1, le=MAX_MAX_SECONDS)
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    geometry: str = DEFAULT_GEOMETRY
    expected_epoch: StrictInt | None = None

    @field_validator("recording_id")
    @classmethod
    def _recording_id(cls, value: str | None) -> str | None:
        if value is not None and not RECORDING_ID_PATTERN.fullmatch(value):
            raise ValueError("recording_id must be 1..64 letters, digits, _ or - (starting with a letter or digit)")
        return value

    @field_validator("session_id")
    @classmethod
    def _session_id(cls, value: str | None) -> str | None:
        return None if value is None else _check_id("session_id", value)


class RecordingInput(BaseModel):
    """Workflow input: which lease's desktop to record, how, and the timers."""

    recording_id: str
    workspace_id: str
    group_id: str
    session_id: str
    subject: str | None = None
    codec: RecordingCodec = "h264-mp4"
    framerate: int = Field(default=DEFAULT_FRAMERATE, ge=1, le=60)
    max_seconds: int = Field(default=DEFAULT_MAX_SECONDS, ge=1, le=MAX_MAX_SECONDS)
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    geometry: str = DEFAULT_GEOMETRY
    expected_epoch: StrictInt | None = None
    timers: RecordingTimers = Field(default_factory=RecordingTimers)

    @field_validator("recording_id")
    @classmethod
    def _recording_id(cls, value: str) -> str:
        if not RECORDING_ID_PATTERN.fullmatch(value):
            raise ValueError("recording_id must be 1..64 letters, digits, _ or - (starting with a letter or digit)")
        return value

    @field_validator("workspace_id", "group_id", "session_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_id("id", value)

    @property
    def lease_id(self) -> str:
        """The lease the recording holds, ``lease/<workspace>/<group>``."""
        return f"lease/{self.workspace_id}/{self.group_id}"

    @property
    def storage_key(self) -> str:
        """Where the finished video is stored."""
        return recording_storage_key(self.workspace_id, self.session_id, self.recording_id, self.codec)


def recording_input(
    workspace_id: str, group_id: str, req: RecordingRequest, recording_id: str, timers: RecordingTimers
) -> RecordingInput:
    """The workflow input for ``req`` on lease ``workspace_id/group_id`` (the session defaults to the group)."""
    return RecordingInput(
        recording_id=recording_id,
        workspace_id=workspace_id,
        group_id=group_id,
        session_id=req.session_id or group_id,
        subject=req.subject,
        codec=req.codec,
        framerate=req.framerate,
        max_seconds=req.max_seconds,
        max_bytes=req.max_bytes,
        geometry=req.geometry,
        expected_epoch=req.expected_epoch,
        timers=timers,
    )


class RecordingStarted(BaseModel):
    """What starting a recording returns: its id and workflow id (the video comes later)."""

    recording_id: str
    workflow_id: str
    lease_id: str


class StopRecordingRequest(BaseModel):
    """Stop the recording (idempotent); ``wait`` returns once it is available or failed."""

    wait: bool = False


class BoxLostNotice(BaseModel):
    """The lease lost the box of this epoch (signal from the lease, or from an observer)."""

    epoch: StrictInt


class StateChange(BaseModel):
    """One state transition of a recording, kept in the workflow state."""

    state: RecordingStateName
    at: datetime
    note: str = ""


class RecordingView(BaseModel):
    """The ``describe`` query result (and the workflow result): everything about one recording."""

    recording_id: str
    workspace_id: str
    group_id: str
    session_id: str
    lease_id: str
    state: RecordingStateName
    reason: RecordingFailureReason | None = None
    detail: str | None = None
    codec: RecordingCodec
    framerate: int
    max_seconds: int
    max_bytes: int
    epoch: StrictInt | None = None
    instance_id: str | None = None
    display: int | None = None
    width: int | None = None
    height: int | None = None
    box_path: str | None = None
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    finalized_at: datetime | None = None
    stop_cause: StopCause | None = None
    size_bytes: int | None = None
    duration_seconds: float | None = None
    storage_key: str | None = None
    sha256: str | None = None
    history: list[StateChange] = Field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the recording reached ``available`` or ``failed``."""
        return self.state in TERMINAL_STATES


# ---------------------------------------------------------------- activities of the recording workflow


class LeaseHolderInput(BaseModel):
    """Hold, heartbeat or release the lease as the ``recording`` holder ``recording_id``."""

    workspace_id: str
    group_id: str
    recording_id: str
    subject: str | None = None
    epoch: StrictInt | None = None
    """Heartbeat: the grant's epoch. Hold: the expected epoch, if any."""


class LeaseBoxLostInput(BaseModel):
    """Tell the lease its box of ``epoch`` looks gone (it confirms with the provider)."""

    workspace_id: str
    group_id: str
    epoch: StrictInt
    instance_id: str


class RecordingBoxInput(BaseModel):
    """One recording's files in one box."""

    backend: str
    envelope: Envelope
    recording_id: str
    codec: RecordingCodec


class FfmpegStartInput(RecordingBoxInput):
    """Launch ffmpeg x11grab on display ``:display`` of the box, backgrounded, with a hard ``-t``."""

    display: int
    width: int
    height: int
    framerate: int
    max_seconds: int


class FfmpegProcess(BaseModel):
    """The running ffmpeg: its pid in the box and where it writes."""

    pid: int
    box_path: str
    adopted: bool = False
    """True when a retried start found the ffmpeg an earlier attempt launched."""


class FfmpegProbe(BaseModel):
    """Whether ffmpeg still runs, and how big its file is so far."""

    alive: bool
    size_bytes: int


class FfmpegStopInput(RecordingBoxInput):
    """SIGINT ffmpeg and wait up to ``wait_seconds`` for it to exit (then SIGKILL)."""

    wait_seconds: float = 8.0


class FfmpegStopped(BaseModel):
    """How the stop went."""

    was_running: bool
    exited: bool
    killed: bool


class InspectInput(RecordingBoxInput):
    """Stat (and ffprobe) the box file against the size gate."""

    max_bytes: int


class Inspection(BaseModel):
    """What the box file is: ``ok`` with its facts, or the failure it proves."""

    outcome: Literal["ok", "box-death", "ffmpeg-error", "max-bytes-exceeded"]
    size_bytes: int | None = None
    duration_seconds: float | None = None
    width: int | None = None
    height: int | None = None
    detail: str | None = None


class UploadInput(RecordingBoxInput):
    """Stream the box file to the artifact store under ``key``; it must be ``size_bytes`` long."""

    key: str
    size_bytes: int


class UploadResult(BaseModel):
    """The stored artifact."""

    key: str
    sha256: str
    size_bytes: int


class ProjectRecordingInput(BaseModel):
    """Write the recording row (upsert, guarded by ``record.version``)."""

    record: RecordingRecord
