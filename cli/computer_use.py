"""``sandboxctl desktop screenshot|click|type|key``: computer use on a lease's desktop from a terminal.

Each command is one call of the lease workflow's ``screenshot`` or ``desktop_input`` update, which
runs the computer-use activity against the lease's warm box (the desktop is brought up if it is not).
The commands join the ``desktop`` group of :mod:`cli.planes` through :func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel

from cli.exits import EXIT_REFUSED, load_settings, with_leases
from cli.output import emit, fail, note
from client.lease_client import LeaseClient, check_update_input
from sandbox.errors import InvalidRequest
from sandbox.failures import call_workflow
from workflows.models.computer_use import DesktopInputRequest, DesktopInputResult, Screenshot, ScreenshotRequest

__all__ = ["register"]

DataDir = typer.Option(None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).")
Json = typer.Option(False, "--json", help="Print one JSON document (for scripts).")
Epoch = typer.Option(None, "--epoch", help="Fail unless the lease is still at this epoch.")
Workspace = typer.Argument(..., help="Workspace id.")
Group = typer.Argument(..., help="Sandbox group id.")

R = TypeVar("R", bound=BaseModel)

SCREENSHOT_UPDATE = "screenshot"
DESKTOP_INPUT_UPDATE = "desktop_input"


def register(app: typer.Typer) -> None:
    """Add ``screenshot``, ``click``, ``type`` and ``key`` to the ``desktop`` group of ``app``'s planes."""
    del app  # the commands join cli.planes' desktop group, which cli.planes.register attaches to the root
    from cli.planes import desktop_app

    if any(c.name == "screenshot" for c in desktop_app.registered_commands):
        return  # already registered (the CLI assembles itself once per process, tests more often)
    desktop_app.command("screenshot")(screenshot)
    desktop_app.command("click")(click)
    desktop_app.command("type")(type_text)
    desktop_app.command("key")(key)


def _update(data_dir: Path | None, workspace: str, group: str, name: str, arg: BaseModel, result_type: type[R]) -> R:
    settings = load_settings(data_dir)

    async def action(leases: LeaseClient) -> R:
        check_update_input(name, arg)  # a refusal exits like the lease's own (before anything is sent)
        handle = leases.handle(workspace, group)
        return await call_workflow(lambda: handle.execute_update(name, arg, result_type=result_type))

    return with_leases(settings, action)


def _input(
    data_dir: Path | None, workspace: str, group: str, epoch: int | None, actions: list[dict[str, Any]]
) -> DesktopInputResult:
    try:
        req = DesktopInputRequest.model_validate({"actions": actions, "epoch": epoch})
    except ValueError as err:
        fail(f"{InvalidRequest.error_type}: {err}", EXIT_REFUSED)
    return _update(data_dir, workspace, group, DESKTOP_INPUT_UPDATE, req, DesktopInputResult)


def screenshot(
    workspace: str = Workspace,
    group: str = Group,
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the PNG."),
    epoch: int | None = Epoch,
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Take a PNG screenshot of the lease's desktop."""
    shot = _update(data_dir, workspace, group, SCREENSHOT_UPDATE, ScreenshotRequest(epoch=epoch), Screenshot)
    output.write_bytes(shot.png)
    result = {
        "path": str(output),
        "bytes": len(shot.png),
        "width": shot.width,
        "height": shot.height,
        "scale": shot.scale,
        "epoch": shot.epoch,
    }
    emit(result if json_out else f"{output} ({shot.width}x{shot.height}, {len(shot.png)} bytes)", json_out)
    if shot.scale < 1.0 and not json_out:
        note(f"scaled to {shot.scale:g} of the {shot.screen_width}x{shot.screen_height} screen to fit the size limit")


def click(
    workspace: str = Workspace,
    group: str = Group,
    x: int = typer.Argument(..., help="X coordinate (pixels from the left)."),
    y: int = typer.Argument(..., help="Y coordinate (pixels from the top)."),
    button: str = typer.Option("left", "--button", help="left, middle or right."),
    double: bool = typer.Option(False, "--double", help="Double-click."),
    epoch: int | None = Epoch,
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Click at (X, Y) on the lease's desktop."""
    action = {"action": "double_click" if double else "click", "x": x, "y": y, "button": button}
    result = _input(data_dir, workspace, group, epoch, [action])
    emit(result if json_out else f"clicked at {result.pointer_x},{result.pointer_y}", json_out)


def type_text(
    workspace: str = Workspace,
    group: str = Group,
    text: str = typer.Argument(..., help="Text to type into the focused window."),
    epoch: int | None = Epoch,
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Type text into the focused window of the lease's desktop."""
    result = _input(data_dir, workspace, group, epoch, [{"action": "type", "text": text}])
    emit(result if json_out else f"typed {len(text)} characters", json_out)


def key(
    workspace: str = Workspace,
    group: str = Group,
    combos: list[str] = typer.Argument(..., help="Key chords in order, e.g. ctrl+a Return."),
    epoch: int | None = Epoch,
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Press key chords (X keysym names joined by +) on the lease's desktop."""
    result = _input(data_dir, workspace, group, epoch, [{"action": "key", "keys": combos}])
    emit(result if json_out else f"pressed {' '.join(combos)}", json_out)
