"""``sandboxctl record start|stop|status|list|get``: desktop recordings of a lease's box.

``start`` starts a :class:`~workflows.recording.RecordingWorkflow` on its own (it holds the lease as a
``recording`` holder, exactly as one started by the lease's ``start_recording`` update does) and
prints the recording id. ``stop`` and ``status`` talk to the workflow; ``list`` reads the
``recordings`` table and ``get`` streams the stored video out of the artifact store, both from the
stack's data dir. Every command takes ``--json``.

:class:`client.recording_client.RecordingClient` is the Python API behind the commands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from temporalio.client import Client

from cli.exits import load_settings, with_store, with_temporal
from cli.output import emit, note, progress
from client.recording_client import RecordingClient, list_recordings, save_recording
from workflows.models.recording import RecordingStarted, RecordingView

__all__ = ["register"]

T = TypeVar("T")

record_app = typer.Typer(help="Record a lease's desktop into a stored video.", no_args_is_help=True)

DataDir = typer.Option(None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).")
Json = typer.Option(False, "--json", help="Print one JSON document (for scripts).")


def register(app: typer.Typer) -> None:
    """Attach ``record`` to the root app."""
    app.add_typer(record_app, name="record")


# --------------------------------------------------------------------------- commands


def _view_json(view: RecordingView) -> dict[str, Any]:
    data: dict[str, Any] = view.model_dump(mode="json", exclude={"history"})
    return data


def _with_recordings(data_dir: Path | None, action: Callable[[RecordingClient], Awaitable[T]]) -> T:
    """Connect, run ``action(RecordingClient)``, and turn failures into clear exits."""
    settings = load_settings(data_dir)

    async def with_client(client: Client) -> T:
        return await action(RecordingClient(client, settings))

    return with_temporal(settings, with_client)


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

    async def action(recordings: RecordingClient) -> RecordingStarted:
        req = recordings.request(
            codec=codec, max_seconds=max_seconds, framerate=framerate, session_id=session, recording_id=recording_id
        )
        return await recordings.start(workspace, group, req)

    started = _with_recordings(data_dir, action)
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

    async def action(recordings: RecordingClient) -> RecordingView:
        with progress(f"stopping {recording_id} and storing the video"):
            return await recordings.stop(recording_id, wait=not no_wait)

    view = _with_recordings(data_dir, action)
    emit(_view_json(view) if json_out else _summary(view), json_out)


@record_app.command("status")
def status(
    recording_id: str = typer.Argument(..., help="Recording id."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show a recording's state (starting, recording, stopping, finalizing, available, failed)."""
    view = _with_recordings(data_dir, lambda recordings: recordings.describe(recording_id))
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
    settings = load_settings(data_dir)
    records = with_store(
        settings, lambda db: list_recordings(db, workspace, session_id=session, limit=limit), read_only=True
    )
    fields = ("recording_id", "session_id", "state", "reason", "codec", "size_bytes", "duration_seconds")
    rows = [
        {**{f: getattr(r, f) for f in fields}, "created_at": r.created_at.isoformat(), "storage_key": r.storage_key}
        for r in records
    ]
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
    settings = load_settings(data_dir)
    saved = with_store(settings, lambda db: save_recording(settings, db, recording_id, output))
    emit(saved if json_out else f"{saved.path} ({saved.size_bytes} bytes)", json_out)


def _summary(view: RecordingView) -> str:
    if view.state == "available":
        return (
            f"{view.recording_id} available: {view.size_bytes} bytes, {view.duration_seconds} s at {view.storage_key}"
        )
    if view.state == "failed":
        return f"{view.recording_id} failed ({view.reason}): {view.detail}"
    return f"{view.recording_id} {view.state}"
