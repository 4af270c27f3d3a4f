"""The recording workflow: one desktop video, from ffmpeg in the box to a stored artifact and its row.

Id ``recording/<recording_id>``; started as a child of the lease workflow (its ``start_recording``
update, see :func:`start_recording_child`) or on its own. States::

    starting → recording → stopping → finalizing → available
        │          │           │           └──────────────→ failed(reason)
        └──────────┴───────────┴──────────────────────────→ failed(reason)

visible through the ``describe`` query and the ``RecordingState`` search attribute.

**The lease.** The recording holds its lease as the ``recording`` holder ``<recording_id>`` for its
whole life, through the lease's own ``acquire``/``heartbeat``/``release`` updates. A workflow cannot
call another workflow's update, so activities make those calls with the worker's client; the lease
stays the single writer of its holders, and a recording started on its own holds the lease exactly
like a child does. A fenced heartbeat (the lease lost the box, or dropped its holders) counts as box
loss, as do ``BoxNotFound`` from the box and the ``box_lost`` signal.

**Start**: ensure the desktop (``ensure_display_stack``), launch ffmpeg x11grab on its display with
the display's geometry and a hard ``-t max_seconds``. **Stop** on the ``stop`` update, the
max-duration timer, ffmpeg exiting by itself, the file passing ``max_bytes``, or box loss: SIGINT,
bounded wait. **Finalize**: inspect (missing → ``box-death``; empty or unreadable →
``ffmpeg-error``; over ``max_bytes`` → ``max-bytes-exceeded`` with the file kept on the box), upload
(streamed; failing → ``upload-failed`` with the file kept for a retry), commit the row
``available``, and only then delete the box files.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from sandbox import errors
    from sandbox.box import Envelope
    from store.records import RecordingFailureReason, RecordingRecord, RecordingStateName
    from workflows import search_attributes as sa
    from workflows.activity_names import ActivityName
    from workflows.errors import failure
    from workflows.models.lease import HeartbeatResult, LeaseGrant
    from workflows.models.planes import DisplayStackRequest, DisplayStackResult
    from workflows.models.recording import (
        BoxLostNotice,
        FfmpegProbe,
        FfmpegProcess,
        FfmpegStartInput,
        FfmpegStopInput,
        FfmpegStopped,
        InspectInput,
        Inspection,
        LeaseBoxLostInput,
        LeaseHolderInput,
        ProjectRecordingInput,
        RecordingBoxInput,
        RecordingInput,
        RecordingRequest,
        RecordingStarted,
        RecordingTimers,
        RecordingView,
        StateChange,
        StopCause,
        StopRecordingRequest,
        UploadInput,
        UploadResult,
        codec_content_type,
        recording_input,
        recording_workflow_id,
    )

__all__ = ["RecordingWorkflow", "start_recording_child"]

_RETRY_FOREVER = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=30))
_FEW = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=2), maximum_attempts=3
)
_FENCED = {errors.StaleEpoch.error_type, errors.HolderNotFound.error_type, errors.LeaseNotFound.error_type}
_HISTORY_KEPT = 20


def _cause(err: ActivityError) -> tuple[str | None, str]:
    """The ApplicationError type and message behind an activity failure."""
    cause: BaseException | None = err.cause
    while cause is not None and not isinstance(cause, ApplicationError):
        cause = getattr(cause, "cause", None)
    if cause is None:
        return None, str(err.cause or err)
    return cause.type, cause.message or str(cause)


class _Failed(Exception):
    """Ends the recording as ``failed(reason)`` (raised inside the workflow, never across it)."""

    def __init__(self, reason: RecordingFailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: RecordingFailureReason = reason
        self.detail = detail


@workflow.defn(name="RecordingWorkflow")
class RecordingWorkflow:
    """Durable owner of one desktop recording."""

    @workflow.init
    def __init__(self, inp: RecordingInput) -> None:
        self.inp = inp
        self.t: RecordingTimers = inp.timers
        self.v = RecordingView(
            recording_id=inp.recording_id,
            workspace_id=inp.workspace_id,
            group_id=inp.group_id,
            session_id=inp.session_id,
            lease_id=inp.lease_id,
            state="starting",
            codec=inp.codec,
            framerate=inp.framerate,
            max_seconds=inp.max_seconds,
            max_bytes=inp.max_bytes,
        )
        self._created_at: datetime | None = None
        self._version = 0
        self._stop_requested = False
        self._box_lost = False
        self._holding = False
        self._finished = False
        self._backend = ""
        self._envelope: Envelope | None = None

    # ------------------------------------------------------------------ run

    @workflow.run
    async def run(self, inp: RecordingInput) -> RecordingView:
        """Record, stop, finalize; always release the lease holder at the end."""
        self._created_at = workflow.now()
        self._note("starting", "recording requested")
        self._publish()
        await self._project()
        try:
            await self._record()
        except _Failed as failed:
            await self._fail(failed.reason, failed.detail)
        finally:
            if self._holding:
                await self._release()
        self._finished = True
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.v

    async def _record(self) -> None:
        grant = await self._hold()
        box = RecordingBoxInput(
            backend=grant.backend, envelope=grant.envelope, recording_id=self.inp.recording_id, codec=self.inp.codec
        )
        display = await self._ensure_display(grant)
        process = await self._start(box, display)
        self.v.box_path = process.box_path
        self.v.started_at = workflow.now()
        self._set_state("recording", f"ffmpeg pid {process.pid} on :{display.display} ({display.geometry})")
        await self._project()

        cause = await self._watch(box)
        self.v.stop_cause = cause
        self._set_state("stopping", f"stop: {cause}")
        await self._stop(box)
        self.v.stopped_at = workflow.now()

        self._set_state("finalizing", "inspecting the video")
        inspection = await self._inspect(box)
        self.v.size_bytes = inspection.size_bytes
        if inspection.outcome != "ok":
            raise _Failed(inspection.outcome, inspection.detail or inspection.outcome)
        assert inspection.size_bytes is not None
        self.v.duration_seconds = inspection.duration_seconds
        if self.v.duration_seconds is None and self.v.started_at is not None:
            # No ffprobe in the box: the wall clock between start and stop is the duration.
            self.v.duration_seconds = round((self.v.stopped_at - self.v.started_at).total_seconds(), 3)
        if inspection.width and inspection.height:
            self.v.width, self.v.height = inspection.width, inspection.height
        stored = await self._upload(box, inspection.size_bytes)
        self.v.storage_key, self.v.sha256, self.v.size_bytes = stored.key, stored.sha256, stored.size_bytes

        # The commit: only once the row says available may the box file go.
        self.v.finalized_at = workflow.now()
        self._set_state("available", f"{stored.size_bytes} bytes stored at {stored.key}")
        await self._project()
        await self._delete_box_files(box)

    # ------------------------------------------------------------------ steps

    async def _hold(self) -> LeaseGrant:
        inp = self.inp
        try:
            grant: LeaseGrant = await workflow.execute_activity(
                ActivityName.RECORDING_HOLD_LEASE,
                LeaseHolderInput(
                    workspace_id=inp.workspace_id,
                    group_id=inp.group_id,
                    recording_id=inp.recording_id,
                    subject=inp.subject,
                    epoch=inp.expected_epoch,
                ),
                result_type=LeaseGrant,
                start_to_close_timeout=timedelta(seconds=self.t.acquire_timeout_seconds),
                heartbeat_timeout=timedelta(seconds=max(self.t.activity_heartbeat_seconds, 5)),
                retry_policy=_FEW,
                summary=f"hold {inp.lease_id} as recording",
            )
        except ActivityError as err:
            kind, message = _cause(err)
            raise _Failed("box-death", f"the lease could not be held ({kind}): {message}") from None
        self._holding = True
        self._backend = grant.backend
        self._envelope = grant.envelope
        self.v.epoch, self.v.instance_id = grant.epoch, grant.instance_id
        return grant

    async def _ensure_display(self, grant: LeaseGrant) -> DisplayStackResult:
        try:
            display: DisplayStackResult = await workflow.execute_activity(
                ActivityName.ENSURE_DISPLAY_STACK,
                DisplayStackRequest(
                    backend=grant.backend,
                    envelope=grant.envelope,
                    lease_id=grant.lease_id,
                    epoch=grant.epoch,
                    geometry=self.inp.geometry,
                ),
                result_type=DisplayStackResult,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=_FEW,
                summary="ensure the desktop",
            )
        except ActivityError as err:
            kind, message = _cause(err)
            if kind == errors.BoxNotFound.error_type:
                raise _Failed("box-death", f"the box is gone: {message}") from None
            raise _Failed("display-unavailable", f"no desktop to record ({kind}): {message}") from None
        w, h = display.geometry.split("x")
        self.v.display, self.v.width, self.v.height = display.display, int(w), int(h)
        return display

    async def _start(self, box: RecordingBoxInput, display: DisplayStackResult) -> FfmpegProcess:
        assert self.v.width is not None and self.v.height is not None
        try:
            result: FfmpegProcess = await workflow.execute_activity(
                ActivityName.RECORDING_START_FFMPEG,
                FfmpegStartInput(
                    **box.model_dump(),
                    display=display.display,
                    width=self.v.width,
                    height=self.v.height,
                    framerate=self.inp.framerate,
                    max_seconds=self.inp.max_seconds,
                ),
                result_type=FfmpegProcess,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=_FEW,
                summary=f"start ffmpeg ({self.inp.codec})",
            )
            return result
        except ActivityError as err:
            kind, message = _cause(err)
            if kind == errors.BoxNotFound.error_type:
                raise _Failed("box-death", f"the box is gone: {message}") from None
            raise _Failed("ffmpeg-error", message) from None

    async def _watch(self, box: RecordingBoxInput) -> StopCause:
        """Wait for a reason to stop, checking ffmpeg and heartbeating the lease every poll."""
        assert self.v.started_at is not None
        deadline = self.v.started_at + timedelta(seconds=self.inp.max_seconds)
        while True:
            if self._stop_requested:
                return "requested"
            if self._box_lost:
                return "box-lost"
            now = workflow.now()
            if now >= deadline:
                return "max-duration"
            wait = min(self.t.poll_seconds, (deadline - now).total_seconds())
            try:
                await workflow.wait_condition(
                    lambda: self._stop_requested or self._box_lost,
                    timeout=max(wait, 0.001),
                    timeout_summary="next recording check",
                )
                continue
            except TimeoutError:
                pass
            if workflow.now() >= deadline:
                return "max-duration"
            probe, alive = await asyncio.gather(self._probe(box), self._heartbeat())
            if self._box_lost or alive is False:
                self._box_lost = True
                return "box-lost"
            if probe is not None and not probe.alive:
                return "ffmpeg-exited"
            if probe is not None and probe.size_bytes > self.inp.max_bytes:
                return "max-bytes"

    async def _probe(self, box: RecordingBoxInput) -> FfmpegProbe | None:
        try:
            result: FfmpegProbe = await workflow.execute_activity(
                ActivityName.RECORDING_PROBE_FFMPEG,
                box,
                result_type=FfmpegProbe,
                start_to_close_timeout=timedelta(seconds=40),
                retry_policy=RetryPolicy(maximum_attempts=2),
                summary="check ffmpeg",
            )
            return result
        except ActivityError as err:
            kind, message = _cause(err)
            if kind == errors.BoxNotFound.error_type:
                await self._lost_box(f"the box is gone: {message}")
            return None

    async def _heartbeat(self) -> bool | None:
        """True: still held; False: fenced (the lease moved on); None: could not tell this time."""
        inp = self.inp
        try:
            await workflow.execute_activity(
                ActivityName.RECORDING_HEARTBEAT_LEASE,
                LeaseHolderInput(
                    workspace_id=inp.workspace_id,
                    group_id=inp.group_id,
                    recording_id=inp.recording_id,
                    epoch=self.v.epoch,
                ),
                result_type=HeartbeatResult,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=2),
                summary="heartbeat the lease",
            )
        except ActivityError as err:
            kind, message = _cause(err)
            if kind in _FENCED:
                self._note(self.v.state, f"lease fenced the recording ({kind}): {message}")
                return False
            return None
        return True

    async def _lost_box(self, note: str) -> None:
        """The box answered NotFound: tell the lease (it confirms with the provider) and stop."""
        if self._box_lost:
            return
        self._box_lost = True
        self._note(self.v.state, note)
        if self._envelope is None or self.v.epoch is None:
            return
        try:
            await workflow.execute_activity(
                ActivityName.RECORDING_REPORT_BOX_LOST,
                LeaseBoxLostInput(
                    workspace_id=self.inp.workspace_id,
                    group_id=self.inp.group_id,
                    epoch=self.v.epoch,
                    instance_id=self._envelope.instance_id,
                ),
                result_type=bool,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(maximum_attempts=2),
                summary="report the box lost to the lease",
            )
        except ActivityError as err:
            workflow.logger.info("reporting the lost box was refused: %s", _cause(err)[1])

    async def _stop(self, box: RecordingBoxInput) -> None:
        try:
            stopped = await workflow.execute_activity(
                ActivityName.RECORDING_STOP_FFMPEG,
                FfmpegStopInput(**box.model_dump(), wait_seconds=self.t.stop_wait_seconds),
                result_type=FfmpegStopped,
                start_to_close_timeout=timedelta(seconds=self.t.stop_wait_seconds + 40),
                retry_policy=_FEW,
                summary="SIGINT ffmpeg",
            )
        except ActivityError as err:
            kind, message = _cause(err)
            if kind == errors.BoxNotFound.error_type:
                await self._lost_box(f"the box is gone: {message}")
            else:
                self._note("stopping", f"stopping ffmpeg failed: {message}")
            return
        if stopped.killed:
            self._note("stopping", f"ffmpeg ignored SIGINT for {self.t.stop_wait_seconds:g} s and was killed")

    async def _inspect(self, box: RecordingBoxInput) -> Inspection:
        try:
            result: Inspection = await workflow.execute_activity(
                ActivityName.RECORDING_INSPECT,
                InspectInput(**box.model_dump(), max_bytes=self.inp.max_bytes),
                result_type=Inspection,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=5)),
                summary="stat and ffprobe the video",
            )
            return result
        except ActivityError as err:
            raise _Failed("upload-failed", f"the video could not be inspected: {_cause(err)[1]}") from None

    async def _upload(self, box: RecordingBoxInput, size: int) -> UploadResult:
        try:
            result: UploadResult = await workflow.execute_activity(
                ActivityName.RECORDING_UPLOAD,
                UploadInput(**box.model_dump(), key=self.inp.storage_key, size_bytes=size),
                result_type=UploadResult,
                start_to_close_timeout=timedelta(seconds=self.t.upload_timeout_seconds),
                heartbeat_timeout=timedelta(seconds=max(self.t.activity_heartbeat_seconds, 5)),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=30),
                    maximum_attempts=self.t.upload_attempts,
                ),
                summary=f"upload {size} bytes",
            )
            return result
        except ActivityError as err:
            kind, message = _cause(err)
            raise _Failed("upload-failed", f"upload failed ({kind}): {message}; the file stays on the box") from None

    async def _delete_box_files(self, box: RecordingBoxInput) -> None:
        try:
            await workflow.execute_activity(
                ActivityName.RECORDING_DELETE_BOX_FILES,
                box,
                result_type=bool,
                start_to_close_timeout=timedelta(seconds=40),
                retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=5)),
                summary="delete the box files",
            )
        except ActivityError as err:
            # The video is stored and committed; a leftover box file only costs space until the box goes.
            self._note("available", f"deleting the box files failed: {_cause(err)[1]}")

    async def _release(self) -> None:
        inp = self.inp
        try:
            await workflow.execute_activity(
                ActivityName.RECORDING_RELEASE_LEASE,
                LeaseHolderInput(workspace_id=inp.workspace_id, group_id=inp.group_id, recording_id=inp.recording_id),
                result_type=bool,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=5)),
                summary="release the lease",
            )
        except ActivityError as err:
            # The holder's TTL releases it anyway.
            workflow.logger.warning("releasing the lease failed: %s", _cause(err)[1])
        self._holding = False

    async def _fail(self, reason: RecordingFailureReason, detail: str) -> None:
        self.v.reason = reason
        self.v.detail = detail[-2000:]
        self.v.finalized_at = workflow.now()
        self._set_state("failed", f"{reason}: {detail[:200]}")
        await self._project()

    # ------------------------------------------------------------------ handlers

    @workflow.update(
        description="Stop recording (idempotent); with wait return once it is available or failed, row committed."
    )
    async def stop(self, req: StopRecordingRequest) -> RecordingView:
        """Stop recording (idempotent); with ``wait`` return once it is available or failed, row committed."""
        self._stop_requested = True
        if req.wait:
            await workflow.wait_condition(lambda: self._finished)
        return self.v

    @workflow.signal(
        description="The lease lost the box of notice.epoch: stop and finalize (the file most likely went with it)."
    )
    def box_lost(self, notice: BoxLostNotice) -> None:
        """The lease lost the box of ``notice.epoch``: stop and finalize (the file most likely went with it)."""
        if self.v.epoch is None or notice.epoch == self.v.epoch:
            self._box_lost = True

    @workflow.query(description="Everything about the recording.")
    def describe(self) -> RecordingView:
        """Everything about the recording."""
        return self.v

    # ------------------------------------------------------------------ state

    def _note(self, state: RecordingStateName, note: str) -> None:
        change = StateChange(state=state, at=workflow.now(), note=note[:300])
        self.v.history = [*self.v.history, change][-_HISTORY_KEPT:]

    def _set_state(self, state: RecordingStateName, note: str) -> None:
        self.v.state = state
        self._note(state, note)
        self._publish()

    def _publish(self) -> None:
        workflow.upsert_search_attributes(
            [sa.RECORDING_STATE.value_set(self.v.state), sa.WORKSPACE_ID.value_set(self.inp.workspace_id)]
        )
        extra = f" ({self.v.reason})" if self.v.reason else ""
        workflow.set_current_details(f"**{self.v.state}**{extra} · {self.inp.codec} · {self.inp.lease_id}")

    async def _project(self) -> None:
        """Write the row as it is now; retried until the store takes it (later writes carry a higher version)."""
        assert self._created_at is not None
        self._version += 1
        v = self.v
        record = RecordingRecord(
            recording_id=v.recording_id,
            workspace_id=v.workspace_id,
            session_id=v.session_id,
            group_id=v.group_id,
            lease_id=v.lease_id,
            state=v.state,
            reason=v.reason,
            detail=v.detail,
            codec=v.codec,
            framerate=v.framerate,
            max_seconds=v.max_seconds,
            max_bytes=v.max_bytes,
            epoch=v.epoch,
            instance_id=v.instance_id,
            width=v.width,
            height=v.height,
            storage_key=v.storage_key if v.state == "available" else None,
            content_type=codec_content_type(v.codec),
            size_bytes=v.size_bytes,
            sha256=v.sha256 if v.state == "available" else None,
            duration_seconds=v.duration_seconds,
            version=self._version,
            created_at=self._created_at,
            started_at=v.started_at,
            finalized_at=v.finalized_at,
            updated_at=workflow.now(),
        )
        await workflow.execute_activity(
            ActivityName.RECORDING_PROJECT,
            ProjectRecordingInput(record=record),
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=max(self.t.activity_heartbeat_seconds, 2)),
            retry_policy=_RETRY_FOREVER,
            summary=f"project {v.state} v{self._version}",
        )


async def start_recording_child(
    workspace_id: str,
    group_id: str,
    req: RecordingRequest,
    timers: RecordingTimers | None = None,
    *,
    recording_id: str | None = None,
) -> RecordingStarted:
    """Start a recording of this lease as a child workflow (call from the lease's ``start_recording`` update).

    The child is abandoned when the lease closes or continues as new (``ParentClosePolicy.ABANDON``):
    it holds the lease itself, so it keeps the box alive across the lease's continue-as-new.

    Raises:
        ApplicationError: ``InvalidRequest`` when a recording with this id already exists.
    """
    rid = recording_id or req.recording_id or f"rec-{workflow.uuid4().hex}"
    inp = recording_input(workspace_id, group_id, req, rid, timers or RecordingTimers())
    try:
        await workflow.start_child_workflow(
            RecordingWorkflow.run,
            inp,
            id=recording_workflow_id(rid),
            parent_close_policy=ParentClosePolicy.ABANDON,
            # A recording id names one video forever (its storage key): never reuse it.
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=f"recording {rid} of {inp.lease_id} ({inp.codec})",
        )
    except WorkflowAlreadyStartedError:
        raise failure(errors.InvalidRequest, f"a recording with id {rid!r} already exists") from None
    return RecordingStarted(recording_id=rid, workflow_id=recording_workflow_id(rid), lease_id=inp.lease_id)
