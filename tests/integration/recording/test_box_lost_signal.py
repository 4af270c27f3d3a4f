"""Box loss seen by the lease reaches its recordings: the lease signals them and they end ``box-death`` at once.

The recordings here check their box only every 20 s (``poll_seconds``), so a recording that ends
within a few seconds of the lease noticing the loss was told by the lease, not by its own probe;
the recording's history shows the ``box_lost`` signal. Set ``SANDBOX_RECORD_HISTORIES=1`` to
(re)write the replay fixtures ``lease_box_lost_recording_signal.json`` and
``recording_box_lost_signal.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType

from client.recording_client import RecordingClient
from providers.local import LocalProvider
from sandbox.box import Envelope
from sandbox.errors import BoxNotFound
from store.recordings import RecordingStore
from tests.conftest import eventually, ids
from tests.integration.recording.conftest import FAST, wait_state
from workflows.models.lease import lease_workflow_id
from workflows.models.recording import recording_workflow_id

pytestmark = pytest.mark.timeout(90)

HISTORIES = Path(__file__).resolve().parents[2] / "replay" / "histories"
# Longer than the test waits for the outcome, shorter than the lease's holder TTL (30 s in tests),
# so the recording is still a holder when the box goes.
SLOW_POLL = FAST.model_copy(update={"poll_seconds": 20.0})
PROMPT_SECONDS = 8.0


async def _signals(runtime: Any, workflow_id: str) -> list[str]:
    history = await runtime.client.get_workflow_handle(workflow_id).fetch_history()
    return [
        e.workflow_execution_signaled_event_attributes.signal_name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]


async def _save_histories(runtime: Any, ws: str, group: str, recording_id: str) -> None:
    if os.environ.get("SANDBOX_RECORD_HISTORIES") != "1":
        return
    for workflow_id, name in (
        (lease_workflow_id(ws, group), "lease_box_lost_recording_signal"),
        (recording_workflow_id(recording_id), "recording_box_lost_signal"),
    ):
        history = await runtime.client.get_workflow_handle(workflow_id).fetch_history()
        (HISTORIES / f"{name}.json").write_text(history.to_json())


@pytest.mark.parametrize("noticed_by", ["report_box_lost", "exec"])
async def test_a_box_lost_by_the_lease_ends_its_recording_as_box_death_promptly(
    runtime: Any, recordings: RecordingClient, noticed_by: str
) -> None:
    leases = runtime.leases()
    ws, group = ids("ws-rec")
    grant = await leases.acquire(ws, group, holder_id="t1")
    started = await recordings.start(ws, group, recordings.request(), timers=SLOW_POLL)
    rid = started.recording_id
    await wait_state(recordings, rid, "recording")
    lease = await leases.describe(ws, group)
    assert ("recording", rid) in {(h.kind, h.holder_id) for h in lease.holders}

    await LocalProvider(runtime.settings.boxes_dir()).terminate(Envelope(**grant.envelope.model_dump()))
    noticed = time.monotonic()
    if noticed_by == "report_box_lost":
        result = await leases.report_box_lost(ws, group, grant.epoch, grant.instance_id)
        assert result.lost and result.epoch == grant.epoch + 1
    else:
        with pytest.raises(BoxNotFound):
            await leases.exec(ws, group, ["true"])

    view = await recordings.result(rid, timeout=30)
    elapsed = time.monotonic() - noticed
    assert (view.state, view.reason, view.stop_cause) == ("failed", "box-death", "box-lost"), view
    assert elapsed < PROMPT_SECONDS, f"the recording took {elapsed:.1f}s to notice (its own check is every 20 s)"
    assert "box_lost" in await _signals(runtime, recording_workflow_id(rid))
    row = await RecordingStore(runtime.db).get(rid)
    assert row is not None and (row.state, row.reason, row.storage_key) == ("failed", "box-death", None)

    # The lease went cold at the next epoch and no longer lists the recording as a holder.
    lease = await eventually(lambda: _cold(leases, ws, group), timeout=30)
    assert lease.epoch == grant.epoch + 1
    assert "recording" not in {h.kind for h in lease.holders}
    if noticed_by == "report_box_lost":
        await _save_histories(runtime, ws, group, rid)


async def _cold(leases: Any, ws: str, group: str) -> Any:
    view = await leases.describe(ws, group)
    return view if view.liveness == "cold" else None
