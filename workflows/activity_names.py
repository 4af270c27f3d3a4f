"""The registered name of every activity: the one list workflows call and the worker registers.

Workflows call activities by name (so workflow modules never import provider or database code)
and activities register under the same member (``@activity.defn(name=ActivityName.X)``). The
values are written into every workflow history (``ActivityTaskScheduled.activityType``), so a
value must never change: a recorded history names the activity by it. A member's name is its value
in upper case.
"""

from __future__ import annotations

from enum import StrEnum, unique

__all__ = ["ActivityName"]


@unique
class ActivityName(StrEnum):
    """Every activity of the runtime, grouped by the workflow that calls it."""

    # The lease workflow: its box.
    PROVISION_BOX = "provision_box"
    TERMINATE_BOX = "terminate_box"
    DISCARD_LEASE_BOXES = "discard_lease_boxes"
    EXEC_IN_BOX = "exec_in_box"
    CHECK_BOX = "check_box"
    # The lease workflow: its store rows and session events.
    PROJECT_LEASE = "project_lease"
    LOAD_LEASE_SEED = "load_lease_seed"
    READ_HOLDER_BEATS = "read_holder_beats"
    PUBLISH_SESSION_EVENT = "publish_session_event"
    # The lease workflow: workspace snapshots.
    CAPTURE_WORKSPACE = "capture_workspace"
    PUBLISH_SNAPSHOT = "publish_snapshot"
    # The lease workflow (and the recording workflow's desktop): planes.
    ENSURE_PLANE = "ensure_plane"
    TEAR_DOWN_PLANES = "tear_down_planes"
    ENSURE_DISPLAY_STACK = "ensure_display_stack"
    TEAR_DOWN_DISPLAY_STACK = "tear_down_display_stack"
    ENSURE_TERMINAL_SERVER = "ensure_terminal_server"
    TEAR_DOWN_TERMINAL_SERVER = "tear_down_terminal_server"
    EXPOSE_STREAM_PORT = "expose_stream_port"
    # The lease workflow: computer use.
    COMPUTER_SCREENSHOT = "computer_screenshot"
    COMPUTER_DESKTOP_INPUT = "computer_desktop_input"
    # The snapshot GC workflow.
    CLAIM_SNAPSHOT_GC = "claim_snapshot_gc"
    DELETE_SNAPSHOT_OBJECTS = "delete_snapshot_objects"
    SETTLE_SNAPSHOT_GC = "settle_snapshot_gc"
    # The orphan sweep workflow.
    SCAN_ORPHAN_BOXES = "scan_orphan_boxes"
    TERMINATE_ORPHAN_BOX = "terminate_orphan_box"
    # The recording workflow.
    RECORDING_HOLD_LEASE = "recording_hold_lease"
    RECORDING_HEARTBEAT_LEASE = "recording_heartbeat_lease"
    RECORDING_RELEASE_LEASE = "recording_release_lease"
    RECORDING_REPORT_BOX_LOST = "recording_report_box_lost"
    RECORDING_START_FFMPEG = "recording_start_ffmpeg"
    RECORDING_PROBE_FFMPEG = "recording_probe_ffmpeg"
    RECORDING_STOP_FFMPEG = "recording_stop_ffmpeg"
    RECORDING_INSPECT = "recording_inspect"
    RECORDING_UPLOAD = "recording_upload"
    RECORDING_DELETE_BOX_FILES = "recording_delete_box_files"
    RECORDING_PROJECT = "recording_project"
