"""Replay every recorded workflow history against the current workflow code.

A change that breaks determinism fails here; evolve workflows with ``workflow.patched`` (or a new
workflow type) and re-record with ``bash scripts/record-histories``.

The Replayer uses the runtime's data converter (sandbox/payload_codec.py) with the fixtures' fixed
payload keys (``payload-keys.json``, a test-only key that protects nothing): histories recorded
before history encryption are unencrypted and pass through the codec; those recorded since are
encrypted with that key (the script exports it as ``SANDBOX_PAYLOAD_KEYS``).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from sandbox import descriptors
from sandbox.descriptors import SnapshotSupport
from sandbox.errors import PayloadKeyUnknown
from sandbox.payload_codec import ENCODING, KEY_ID_METADATA, PayloadKeys, data_converter_for
from tests.temporal_history import payloads_in
from worker import WORKFLOWS
from workflows.backend_profile import backend_profile

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
FIXTURE_KEYS = PayloadKeys.from_json((Path(__file__).parent / "payload-keys.json").read_text())
ENCRYPTED = Path(__file__).parent / "histories" / "lease_exec_encrypted.json"

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
    # Acquire, exec, release with history encryption on (every payload is ciphertext).
    "lease_exec_encrypted",
    # Capture and restore by a lease whose seed froze its backend's descriptor into its state;
    # lease_drain_capture_restore is the same path from before (the lease read the table).
    "lease_frozen_profile_drain_capture_restore",
    # The stop signal (the run it completed), the operator hold, a failed capture that keeps the box
    # and retries, periodic capture then a lost box restored from it, start_recording on the lease,
    # and a drain under a viewer (stream.url.rotated published, planes torn down).
    "lease_stop_signal",
    "lease_hold_unhold",
    "lease_capture_failure_retry",
    "lease_periodic_capture_box_lost_restore",
    "lease_start_recording",
    "lease_viewer_drain_stream_url_rotated",
    # A warming that fails on a missing setting (the discard after it fails too) leaves the lease live
    # and cold (patch warming-failure-keeps-lease); an offline agent ends its warming at once
    # (patch offline-agent-fails-warming).
    "lease_unconfigured_backend_stays_cold",
    "lease_offline_agent_fails_warming",
}


def test_every_lease_path_has_a_history() -> None:
    assert REQUIRED <= {p.stem for p in HISTORIES}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=data_converter_for(FIXTURE_KEYS))
    await replayer.replay_workflow(history)


def _local_keeps_no_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Edit today's descriptor table: the local backend no longer keeps snapshots."""
    local = descriptors.CAPABILITY_DESCRIPTORS["local"]
    edited = local.model_copy(update={"snapshot": SnapshotSupport(kind="none", has_tar_fallback=False)})
    monkeypatch.setattr(
        descriptors, "CAPABILITY_DESCRIPTORS", MappingProxyType({**descriptors.CAPABILITY_DESCRIPTORS, "local": edited})
    )
    assert not backend_profile("local").keeps_snapshots


async def _replay_failure(name: str) -> Exception | None:
    path = Path(__file__).parent / "histories" / f"{name}.json"
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=data_converter_for(FIXTURE_KEYS))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    return result.replay_failure


async def test_a_lease_with_a_frozen_profile_replays_whatever_the_descriptor_table_says_today(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Editing a descriptor changes nothing a recorded lease decided: its profile is in its history."""
    _local_keeps_no_snapshots(monkeypatch)
    assert await _replay_failure("lease_frozen_profile_drain_capture_restore") is None


async def test_a_lease_recorded_before_the_profile_still_reads_todays_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the same path recorded before the patch decides from today's table, so the edit breaks it."""
    _local_keeps_no_snapshots(monkeypatch)
    # It now terminates the box where its history captured the workspace first.
    assert isinstance(await _replay_failure("lease_drain_capture_restore"), NondeterminismError)


def test_encrypted_fixture_is_encrypted() -> None:
    """Every payload of the encrypted fixture is ciphertext under the fixture key (no plain JSON left)."""
    history = WorkflowHistory.from_json(ENCRYPTED.stem, ENCRYPTED.read_text())
    encodings = set()
    for event in history.events:
        for payload in payloads_in(event):
            encodings.add((payload.metadata.get("encoding"), payload.metadata.get(KEY_ID_METADATA)))
    assert encodings == {(ENCODING, FIXTURE_KEYS.current.encode())}


async def test_encrypted_history_needs_its_key() -> None:
    """Negative control: the same encrypted history does not replay without the key it names."""
    history = WorkflowHistory.from_json(ENCRYPTED.stem, ENCRYPTED.read_text())
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=data_converter_for(PayloadKeys.generate("other")))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    # The activation fails with our typed error (its message is itself encrypted in the failure).
    assert PayloadKeyUnknown.error_type in str(result.replay_failure)
