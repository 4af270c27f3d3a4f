"""``sandboxctl record start|stop|status|list|get``: desktop recordings of a lease's box.

``start`` starts a :class:`~workflows.recording.RecordingWorkflow` on its own (it holds the lease as a
``recording`` holder, exactly as one started by the lease's ``start_recording`` update does) and
prints the recording id. ``stop`` and ``status`` talk to the workflow; ``list`` reads the
``recordings`` table and ``get`` streams the stored video out of the artifact store, both from the
stack's data dir. Every command takes ``--json``.

:class:`RecordingClient` is the Python API behind the commands.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import typer
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

from cli.output import emit, fail, note, progress
from sandbox.errors import InvalidRequest, RecordingNotFound, SandboxError
from sandbox.settings import Settings
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

__all__ = ["RecordingClient", "recording_timers", "register"]

record_app = typer.Typer(help="Record a lease's desktop into a stored video.", no_args_is_help=True)

DataDir = typer.Option(None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).")
Json = typer.Option(False, "--json", help="Print one JSON document (for scripts).")


def register(app: typer.Typer) -> None:
    """Attach ``record`` to the root app."""
    app.add_typer(record_app, name="record")


def recording_timers(settings: Settings) -> RecordingTimers:
    """The recording workflow's timers configured by ``SANDBOX_*`` settings."""
    return RecordingTimers(
        poll_seconds=settings.recording_poll_seconds,
        stop_wait_seconds=settings.recording_stop_wait_seconds,
        activity_heartbeat_seconds=settings.activity_heartbeat_seconds,
        acquire_timeout_seconds=settings.warming_ttl_seconds + 60,
    )


def _translate(err: BaseException, recording_id: str) -> SandboxError:
    from client.lease_client import translate

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
        from client.lease_client import validate_lease_ids

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
            view: RecordingView = await handle.execute_update(RecordingWorkflow.stop, StopRecordingRequest(wait=wait))
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


# --------------------------------------------------------------------------- commands


def _view_json(view: RecordingView) -> dict[str, Any]:
    data: dict[str, Any] = view.model_dump(mode="json", exclude={"history"})
    return data


@record_app.command("start")
def start(
    workspace: str = typer.Argument(..., help="Workspace id."),
    group: str = typer.Argument(..., help="Sandbox group id (the lease to record)."),
    codec: str | None = typer.Option(None, "--codec", help="h264-mp4 (default) or vp9-webm."),
    max_seconds: int | None = typer.Option(None, "--max-seconds", help="Hard ceiling (default 600)."),
    framerate: int | None = typer.Option(None, "--framerate", help="Frames per second (default 15)."),
    session: str | None = typer.Option(None, "--session", help="Session the video belongs to (default: group)."),
    recording_id: str | None = typer.Option(None, "--id", help="Recording id (default: rec-<uuid>)."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Start recording the lease's desktop; prints the recording id."""
    from cli.lease import _settings

    settings = _settings(data_dir)

    async def action(recordings: RecordingClient) -> RecordingStarted:
        req = recordings.request(
            codec=codec, max_seconds=max_seconds, framerate=framerate, session_id=session, recording_id=recording_id
        )
        return await recordings.start(workspace, group, req)

    started = _run(settings, action)
    if json_out:
        emit(started, True)
        return
    emit(started.recording_id, False)
    note(f"next: sandboxctl record stop {started.recording_id}")


@record_app.command("stop")
def stop(
    recording_id: str = typer.Argument(..., help="Recording id."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return at once instead of waiting for the video."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Stop a recording and (unless --no-wait) wait until it is available or failed."""
    from cli.lease import _settings

    settings = _settings(data_dir)

    async def action(recordings: RecordingClient) -> RecordingView:
        with progress(f"stopping {recording_id} and storing the video"):
            return await recordings.stop(recording_id, wait=not no_wait)

    view = _run(settings, action)
    emit(_view_json(view) if json_out else _summary(view), json_out)


@record_app.command("status")
def status(
    recording_id: str = typer.Argument(..., help="Recording id."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show a recording's state (starting, recording, stopping, finalizing, available, failed)."""
    from cli.lease import _settings

    settings = _settings(data_dir)
    view = _run(settings, lambda recordings: recordings.describe(recording_id))
    emit(_view_json(view), json_out)


@record_app.command("list")
def list_(
    workspace: str = typer.Argument(..., help="Workspace id."),
    session: str | None = typer.Option(None, "--session", help="Only this session's recordings."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """List a workspace's recordings from the store, newest first."""
    from cli.lease import _settings
    from store.database import Database
    from store.recordings import RecordingStore

    settings = _settings(data_dir)

    async def main() -> list[dict[str, Any]]:
        db = Database.for_settings(settings)
        try:
            await db.migrate()
            rows = await RecordingStore(db).list(workspace, session_id=session, limit=limit)
        finally:
            await db.dispose()
        fields = ("recording_id", "session_id", "state", "reason", "codec", "size_bytes", "duration_seconds")
        return [
            {**{f: getattr(r, f) for f in fields}, "created_at": r.created_at.isoformat(), "storage_key": r.storage_key}
            for r in rows
        ]

    try:
        rows = asyncio.run(main())
    except SandboxError as err:
        fail(f"{err.error_type}: {err.message}", 2)
    if not rows and not json_out:
        note(f"no recordings in workspace {workspace}")
        return
    emit(rows, json_out)


@record_app.command("get")
def get(
    recording_id: str = typer.Argument(..., help="Recording id."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the video."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Write a stored recording's video to a file (streamed; the row must be available)."""
    from cli.lease import _settings

    settings = _settings(data_dir)

    async def main() -> dict[str, Any]:
        from store.artifacts import FilesystemArtifactStore, artifact_root
        from store.database import Database
        from store.recordings import RecordingStore

        db = Database.for_settings(settings)
        try:
            await db.migrate()
            record = await RecordingStore(db).get(recording_id)
        finally:
            await db.dispose()
        if record is None:
            raise RecordingNotFound(f"no recording {recording_id!r} in the store")
        if record.state != "available" or record.storage_key is None:
            detail = f" ({record.reason}: {record.detail})" if record.reason else ""
            raise InvalidRequest(f"recording {recording_id} is {record.state}{detail}, not available")
        store = FilesystemArtifactStore(artifact_root(settings))
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
        return {
            "recording_id": recording_id,
            "path": str(output),
            "size_bytes": written,
            "content_type": record.content_type,
            "duration_seconds": record.duration_seconds,
        }

    try:
        result = asyncio.run(main())
    except SandboxError as err:
        fail(f"{err.error_type}: {err.message}", 2)
    emit(result if json_out else f"{result['path']} ({result['size_bytes']} bytes)", json_out)


def _summary(view: RecordingView) -> str:
    if view.state == "available":
        return (
            f"{view.recording_id} available: {view.size_bytes} bytes, {view.duration_seconds} s at {view.storage_key}"
        )
    if view.state == "failed":
        return f"{view.recording_id} failed ({view.reason}): {view.detail}"
    return f"{view.recording_id} {view.state}"


def _run(settings: Settings, action: Any) -> Any:
    """Connect, run ``action(RecordingClient)``, and turn failures into clear exits."""
    from cli.lease import EXIT_REFUSED, EXIT_UNREACHABLE
    from worker import connect

    async def main() -> Any:
        try:
            client = await connect(settings)
        except RuntimeError as err:
            fail(
                f"cannot reach Temporal at {settings.temporal_address} ({err}); is `sandboxctl up` running?",
                EXIT_UNREACHABLE,
            )
        return await action(RecordingClient(client, settings))

    try:
        return asyncio.run(main())
    except SandboxError as err:
        fail(f"{err.error_type}: {err.message}", EXIT_REFUSED)
