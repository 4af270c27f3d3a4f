"""Replay every recorded workflow history against the current workflow code.

A change that breaks determinism fails here; evolve workflows with ``workflow.patched`` (or a new
workflow type) and re-record with ``bash scripts/record-histories``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from worker import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))

# Every lease path the issue names must have a recorded history.
REQUIRED = {
    "lease_cold_acquire_idle_drain",
    "lease_rearm",
    "lease_holder_ttl_expiry",
    "lease_box_lost",
    "lease_continue_as_new",
    "lease_provision_failed",
    "lease_stop_and_restart",
    "lease_drain_capture_restore",
    "lease_rotation",
    "snapshot_gc",
    "orphan_sweep",
    "recording_available",
    "recording_max_seconds",
    "recording_max_bytes_exceeded",
    "recording_box_death",
    "recording_display_unavailable",
    # The lease signals its recordings when it loses their box (patch recording-box-lost-signal).
    "lease_box_lost_recording_signal",
    "recording_box_lost_signal",
    # Screenshot and desktop input through the lease (in-flight operations on the warm box).
    "lease_computer_use",
}


def test_every_lease_path_has_a_history() -> None:
    assert REQUIRED <= {p.stem for p in HISTORIES}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
