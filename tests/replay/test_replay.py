"""Replay every recorded workflow history against the current workflow code.

A change that breaks determinism fails here; evolve workflows with ``workflow.patched`` (or a new
workflow type) and re-record with ``bash scripts/record-histories``.

The Replayer uses the runtime's data converter (sandbox/payload_codec.py) with the fixtures' fixed
payload keys (``payload-keys.json``, a test-only key that protects nothing): histories recorded
before history encryption are unencrypted and pass through the codec; those recorded since are
encrypted with that key (the script exports it as ``SANDBOX_PAYLOAD_KEYS``).
"""

from __future__ import annotations

import json
import re
import sys
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
from tests.conftest import REPO
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
    # A lease on a self-hosted machine (acquire, exec, drain with no snapshot), and one for an agent
    # that never answers: warming runs out its TTL and the lease goes cold with no box anywhere.
    "lease_selfhosted_acquire_exec_drain",
    "lease_selfhosted_offline_warming_expiry",
    # A warming that fails on a missing setting (the discard after it fails too) leaves the lease live
    # and cold (patch warming-failure-keeps-lease); an offline agent ends its warming at once
    # (patch offline-agent-fails-warming).
    "lease_unconfigured_backend_stays_cold",
    "lease_offline_agent_fails_warming",
    # Holders heartbeat through the store; the lease reads it at their deadlines, re-arms them, then
    # expires a silent one (patch holder-heartbeats-off-history), also across continue-as-new; and
    # attach/release on a lease kept warm by another holder: the deadline timer kept, search
    # attributes and the projection written only on change (leases seeded with a store id).
    "lease_heartbeats_off_history",
    "lease_continue_as_new_heartbeats",
    "lease_lean_attach_release",
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


# --- every workflow.patched branch has a history with its marker and one from before it ------------

_PATCH_CALL = re.compile(r"workflow\.(?:patched|deprecate_patch)\((?P<arg>[^)]+)\)")
_WORKFLOW_SOURCES = sorted((REPO / "workflows").glob("*.py"))


def _patch_ids() -> dict[str, str]:
    """Each patch id the workflow code checks, mapped to the file that checks it."""
    found: dict[str, str] = {}
    for source in _WORKFLOW_SOURCES:
        text = source.read_text()
        constants = dict(re.findall(r'^(_[A-Z_]+_PATCH)\s*=\s*"([^"]+)"', text, re.M))
        for match in _PATCH_CALL.finditer(text):
            arg = match["arg"].strip()
            patch_id = constants.get(arg) or arg.strip("\"'")
            found[patch_id] = source.name
    return found


def _markers(path: Path) -> set[str]:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    ids: set[str] = set()
    for event in history.events:
        if event.HasField("marker_recorded_event_attributes"):
            details = event.marker_recorded_event_attributes.details
            if "patch-data" in details:
                ids.add(json.loads(details["patch-data"].payloads[0].data)["id"])
    return ids


def _lease_histories() -> list[Path]:
    return [p for p in HISTORIES if p.stem.startswith("lease_")]


def test_every_patch_has_a_history_with_its_marker_and_one_recorded_before_it() -> None:
    patches = _patch_ids()
    assert {"stream-url-rotated-event", "recording-box-lost-signal"} <= patches.keys()  # the scan finds them
    marked = {p.stem: _markers(p) for p in _lease_histories()}
    for patch_id, source in patches.items():
        with_marker = [name for name, ids in marked.items() if patch_id in ids]
        assert with_marker, (
            f"{source} checks workflow.patched({patch_id!r}) but no history under tests/replay holds its "
            "marker: record one with scripts/record-histories"
        )
        # Histories without the marker replay the old branch (every patched id predates some fixture).
        assert [name for name, ids in marked.items() if patch_id not in ids], patch_id


def test_the_patch_scan_sees_a_new_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Positive control: a workflow that gains a patch id no history holds is reported.
    extra = tmp_path / "new_workflow.py"
    extra.write_text('_NEW_THING_PATCH = "new-thing"\nif workflow.patched(_NEW_THING_PATCH):\n    pass\n')
    monkeypatch.setattr(sys.modules[__name__], "_WORKFLOW_SOURCES", [*_WORKFLOW_SOURCES, extra])
    assert _patch_ids()["new-thing"] == "new_workflow.py"
    with pytest.raises(AssertionError, match="new-thing"):
        test_every_patch_has_a_history_with_its_marker_and_one_recorded_before_it()
