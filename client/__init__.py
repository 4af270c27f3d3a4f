"""The client of the sandbox runtime: what a scheduler, a web backend or ``sandboxctl`` builds on.

- :class:`LeaseClient` acquires, heartbeats, releases and operates leases (``exec``, viewers, drain).
- :class:`ViewerSession` keeps one viewer's cell (edge URL + stream token) valid and current;
  :class:`SessionEventFeed` tells it at once when the lease moves to a new box.
- :class:`BoxAccess` opens Channel-A (files, git, PTYs) on a lease's box.
- :class:`RecordingClient` starts, stops and watches desktop recordings.
- :func:`resolve_settings` finds the stack of a data dir; :func:`open_leases` (an async context
  manager: what a script should use, it exits cleanly), :func:`connect_leases`,
  :func:`connect_temporal` and :func:`open_store` connect to it.

Every call raises the typed errors re-exported here (all :class:`SandboxError`), never Temporal's
transport exceptions.
"""

from client.box_access import BoxAccess
from client.connection import (
    NoRunningStack,
    TemporalUnreachable,
    connect_leases,
    connect_temporal,
    open_leases,
    open_store,
)
from client.events import SessionEventFeed
from client.lease_client import LeaseClient, ViewerCell, validate_lease_ids
from client.recording_client import RecordingClient, SavedRecording, list_recordings, save_recording
from client.stack import StackInfo, resolve_settings
from client.viewer import ViewerSession, cell_document
from sandbox.capabilities import SessionCapabilities
from sandbox.errors import (
    BoxNotFound,
    ChannelAError,
    HolderNotFound,
    InvalidRequest,
    LeaseError,
    LeaseNotFound,
    LeaseNotWarm,
    LeaseStopping,
    OutcomeUnknown,
    ProvisionFailed,
    RecordingNotFound,
    SandboxConfigError,
    SandboxError,
    StaleEpoch,
)
from sandbox.settings import Settings
from workflows.models.lease import ExecOutcome, HeartbeatResult, LeaseGrant, LeaseView, ReleaseResult
from workflows.models.recording import RecordingRequest, RecordingStarted, RecordingView

__all__ = [
    "BoxAccess",
    "BoxNotFound",
    "ChannelAError",
    "ExecOutcome",
    "HeartbeatResult",
    "HolderNotFound",
    "InvalidRequest",
    "LeaseClient",
    "LeaseError",
    "LeaseGrant",
    "LeaseNotFound",
    "LeaseNotWarm",
    "LeaseStopping",
    "LeaseView",
    "NoRunningStack",
    "OutcomeUnknown",
    "ProvisionFailed",
    "RecordingClient",
    "RecordingNotFound",
    "RecordingRequest",
    "RecordingStarted",
    "RecordingView",
    "ReleaseResult",
    "SandboxConfigError",
    "SandboxError",
    "SavedRecording",
    "SessionCapabilities",
    "SessionEventFeed",
    "Settings",
    "StackInfo",
    "StaleEpoch",
    "TemporalUnreachable",
    "ViewerCell",
    "ViewerSession",
    "cell_document",
    "connect_leases",
    "connect_temporal",
    "list_recordings",
    "open_leases",
    "open_store",
    "resolve_settings",
    "save_recording",
    "validate_lease_ids",
]
