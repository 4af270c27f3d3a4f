"""Recordings and computer use through the lease workflow's own updates (``start_recording``, ``screenshot``).

These run once the lease workflow has the updates described in the recording report (they are
skipped before that).
"""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.client import WorkflowUpdateFailedError

from activities.models import Screenshot, ScreenshotRequest
from client.recording_client import RecordingClient
from tests.conftest import ids
from tests.integration.recording.conftest import wait_state
from workflows.recording_models import RecordingRequest, RecordingStarted

pytestmark = pytest.mark.timeout(90)


async def test_start_recording_on_the_lease_runs_a_child_that_holds_the_lease(
    runtime: Any, recordings: RecordingClient
) -> None:
    leases = runtime.leases()
    ws, group = ids("ws-rec")
    async with leases.hold(ws, group) as grant:
        handle = leases.handle(ws, group)
        started = await handle.execute_update(
            "start_recording", RecordingRequest(codec="h264-mp4"), result_type=RecordingStarted
        )
        assert started.lease_id == grant.lease_id and started.workflow_id == f"recording/{started.recording_id}"
        await wait_state(recordings, started.recording_id, "recording")
        described = await recordings.handle(started.recording_id).describe()
        assert described.parent_id == grant.lease_id
        lease = await leases.describe(ws, group)
        assert ("recording", started.recording_id) in {(h.kind, h.holder_id) for h in lease.holders}

        shot = await handle.execute_update("screenshot", ScreenshotRequest(), result_type=Screenshot)
        assert shot.png.startswith(b"\x89PNG") and shot.epoch == grant.epoch

        view = await recordings.stop(started.recording_id, wait=True)
        assert view.state == "available", view

        with pytest.raises(WorkflowUpdateFailedError) as err:
            await handle.execute_update(
                "start_recording", RecordingRequest(expected_epoch=grant.epoch + 5), result_type=RecordingStarted
            )
        assert getattr(err.value.cause, "type", None) == "StaleEpoch"
        with pytest.raises(WorkflowUpdateFailedError) as err:
            await handle.execute_update(
                "start_recording",
                RecordingRequest(recording_id=started.recording_id),
                result_type=RecordingStarted,
            )
        assert getattr(err.value.cause, "type", None) == "InvalidRequest"
