"""``RecordingClient``: start, stop and watch desktop recordings; fetch a stored video.

A recording is a :class:`~workflows.recording.RecordingWorkflow` that holds its lease as a
``recording`` holder (exactly as one started by the lease's ``start_recording`` update does).
:class:`RecordingClient` drives those workflows through Temporal; :func:`save_recording` copies a
finished recording's video out of the artifact store of the data dir (the store the worker wrote
it to, so it runs where that store is reachable).

Example::

    recordings = RecordingClient(await connect_temporal(settings), settings)
    started = await recordings.start("ws1", "g1")
    view = await recordings.stop(started.recording_id, wait=True)
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio.client import (
    Client,
    RPCError,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCStatusCode

from client.lease_client import validate_lease_ids
from sandbox.errors import InvalidRequest, RecordingNotFound, SandboxError
from sandbox.failures import translate
from sandbox.settings import Settings
from store.database import Database
from store.records import RecordingRecord
from workflows.models.recording import (
    RECORDING_ID_PATTERN,
    RecordingRequest,
    RecordingStarted,
    RecordingTimers,
    RecordingView,
    StopRecordingRequest,
    recording_input,
    recording_workflow_id,
)
from workflows.recording import RecordingWorkflow

__all__ = ["RecordingClient", "SavedRecording", "list_recordings", "recording_timers", "save_recording"]


def recording_timers(settings: Settings) -> RecordingTimers:
    """The recording workflow's timers configured by ``SANDBOX_*`` settings."""
    return RecordingTimers(
        poll_seconds=settings.recording_poll_seconds,
        stop_wait_seconds=settings.recording_stop_wait_seconds,
        activity_heartbeat_seconds=settings.activity_heartbeat_seconds,
        acquire_timeout_seconds=settings.warming_ttl_seconds + 60,
    )


def _translate(err: BaseException, recording_id: str) -> BaseException:
    if isinstance(err, RPCError) and err.status == RPCStatusCode.NOT_FOUND:
        return RecordingNotFound(f"no recording {recording_id!r} (sandboxctl record list WORKSPACE)")
    return translate(err)


class RecordingClient:
    """Start, stop and watch recordings through their workflows.

    Args:
        client: A Temporal client with the pydantic data converter.
        settings: Task queue and recording defaults.
    """

    def __init__(self, client: Client, settings: Settings | None = None) -> None:
        self.client = client
        self.settings = settings or Settings()

    def request(self, **fields: Any) -> RecordingRequest:
        """A request with the settings' defaults for every field not given.

        Raises:
            InvalidRequest: A field is out of range or malformed.
        """
        s = self.settings
        values: dict[str, Any] = {
            "codec": s.recording_codec,
            "framerate": s.recording_framerate,
            "max_seconds": s.recording_max_seconds,
            "max_bytes": s.recording_max_bytes,
        }
        values.update({k: v for k, v in fields.items() if v is not None})
        try:
            return RecordingRequest(**values)
        except ValueError as err:
            raise InvalidRequest(f"invalid recording request: {err}") from None

    def handle(self, recording_id: str) -> WorkflowHandle[RecordingWorkflow, RecordingView]:
        """The workflow handle of one recording.

        Raises:
            InvalidRequest: The id is malformed.
        """
        if not RECORDING_ID_PATTERN.fullmatch(recording_id):
            raise InvalidRequest(f"{recording_id!r} is not a recording id")
        return self.client.get_workflow_handle_for(RecordingWorkflow.run, recording_workflow_id(recording_id))

    async def start(
        self,
        workspace_id: str,
        group_id: str,
        request: RecordingRequest | None = None,
        *,
        timers: RecordingTimers | None = None,
    ) -> RecordingStarted:
        """Start recording the desktop of lease ``workspace_id/group_id`` (its workflow must exist).

        Raises:
            InvalidRequest: Bad ids, or a recording with this id already exists.
        """
        validate_lease_ids(workspace_id, group_id)
        req = request or self.request()
        rid = req.recording_id or f"rec-{uuid.uuid4().hex}"
        inp = recording_input(workspace_id, group_id, req, rid, timers or recording_timers(self.settings))
        try:
            await self.client.start_workflow(
                RecordingWorkflow.run,
                inp,
                id=recording_workflow_id(rid),
                task_queue=self.settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=f"recording {rid} of {inp.lease_id} ({inp.codec})",
            )
        except WorkflowAlreadyStartedError:
            raise InvalidRequest(f"a recording with id {rid!r} already exists") from None
        except RPCError as err:
            raise _translate(err, rid) from err
        return RecordingStarted(recording_id=rid, workflow_id=recording_workflow_id(rid), lease_id=inp.lease_id)

    async def describe(self, recording_id: str) -> RecordingView:
        """The recording's state from its workflow (works after it finished).

        Raises:
            RecordingNotFound: No such recording workflow.
        """
        handle = self.handle(recording_id)
        try:
            view: RecordingView = await handle.query(RecordingWorkflow.describe)
        except (WorkflowQueryFailedError, RPCError) as err:
            raise _translate(err, recording_id) from err
        return view

    async def stop(self, recording_id: str, *, wait: bool = False) -> RecordingView:
        """Stop the recording (idempotent: a finished one just reports its state).

        Raises:
            RecordingNotFound: No such recording workflow.
        """
        handle = self.handle(recording_id)
        try:
            # By name: the SDK's typing of an update declared with keyword options (description=)
            # wraps the coroutine's result type once more.
            view: RecordingView = await handle.execute_update(
                "stop", StopRecordingRequest(wait=wait), result_type=RecordingView
            )
        except WorkflowUpdateFailedError as err:
            raise _translate(err, recording_id) from err
        except RPCError as err:
            # An update cannot reach a finished workflow; a finished recording is already stopped.
            if err.status != RPCStatusCode.NOT_FOUND:
                raise _translate(err, recording_id) from err
            return await self.describe(recording_id)
        return view

    async def result(self, recording_id: str, *, timeout: float | None = None) -> RecordingView:
        """Wait until the recording is available or failed and return its final state."""
        handle = self.handle(recording_id)
        try:
            view: RecordingView = await asyncio.wait_for(handle.result(), timeout)
        except WorkflowFailureError as err:
            raise SandboxError(f"recording workflow {recording_id} failed: {err.cause}") from err
        except RPCError as err:
            raise _translate(err, recording_id) from err
        return view


async def list_recordings(
    db: Database, workspace_id: str, *, session_id: str | None = None, limit: int = 50
) -> list[RecordingRecord]:
    """A workspace's recordings from the store (optionally one session's), newest first.

    Raises:
        InvalidRequest: ``limit`` is out of range.
    """
    from store.recordings import RecordingStore

    return await RecordingStore(db).list(workspace_id, session_id=session_id, limit=limit)


class SavedRecording(BaseModel):
    """Where :func:`save_recording` wrote a video, and what it is."""

    recording_id: str
    path: str
    size_bytes: int
    content_type: str
    duration_seconds: float | None


async def save_recording(settings: Settings, db: Database, recording_id: str, output: Path) -> SavedRecording:
    """Stream a stored recording's video to ``output`` (through a temp file beside it; its size is checked).

    Raises:
        RecordingNotFound: The store has no such recording.
        InvalidRequest: The recording is not ``available`` (still recording, or failed).
        SandboxError: The stored video's size differs from its row (nothing is written).
    """
    from store.artifacts import artifact_store
    from store.recordings import RecordingStore

    record = await RecordingStore(db).get(recording_id)
    if record is None:
        raise RecordingNotFound(f"no recording {recording_id!r} in the store")
    if record.state != "available" or record.storage_key is None:
        detail = f" ({record.reason}: {record.detail})" if record.reason else ""
        raise InvalidRequest(f"recording {recording_id} is {record.state}{detail}, not available")
    store = artifact_store(settings)
    written = 0
    temp = output.with_name(f".{output.name}.part")
    with temp.open("wb") as f:
        async for chunk in store.get(record.storage_key):
            await asyncio.to_thread(f.write, chunk)
            written += len(chunk)
    if written != record.size_bytes:
        temp.unlink(missing_ok=True)
        raise SandboxError(f"the stored video has {written} bytes, its row says {record.size_bytes}")
    temp.replace(output)
    return SavedRecording(
        recording_id=recording_id,
        path=str(output),
        size_bytes=written,
        content_type=record.content_type,
        duration_seconds=record.duration_seconds,
    )
