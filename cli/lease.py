"""``sandboxctl lease ...`` and ``sandboxctl exec``: drive leases from a terminal or a script.

Every command finds the running stack from the data dir (``--data-dir``, ``SANDBOX_DATA_DIR`` or
``./.sandbox``), takes ``--json`` for scripts, and exits non-zero with a one-line error that says
what to do when something is refused.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import typer

from cli.exits import EXIT_USAGE, load_settings, with_leases, with_store
from cli.output import emit, fail, progress
from client.lease_client import LeaseClient
from sandbox.capabilities import SessionCapabilities
from sandbox.errors import SandboxError, StaleEpoch
from store.database import Database
from store.leases import LeaseRepository
from store.records import LeaseRecord
from workflows.models.lease import (
    LIVENESS_VALUES,
    ExecOutcome,
    HeartbeatResult,
    HolderKind,
    LeaseGrant,
    LeaseView,
    ReleaseResult,
)

lease_app = typer.Typer(help="Acquire, inspect and release sandbox leases.", no_args_is_help=True)

DataDir = typer.Option(None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).")
Json = typer.Option(False, "--json", help="Print one JSON document (for scripts).")
Kind = typer.Option("turn", "--kind", help="Holder kind: turn, viewer, direct, recording or process.")


def register(app: typer.Typer) -> None:
    """Attach ``lease`` and ``exec`` to the root app."""
    app.add_typer(lease_app, name="lease")
    app.command(
        "exec",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help="Run a command in the lease's warm box: sandboxctl exec WORKSPACE GROUP -- CMD ...",
    )(exec_command)


def _holder_kind(value: str) -> HolderKind:
    # Typer passes the option as text; LeaseClient refuses an unknown kind with InvalidRequest (exit 2).
    return cast(HolderKind, value)


def _grant_json(grant: LeaseGrant) -> dict[str, Any]:
    return {
        "lease_id": grant.lease_id,
        "epoch": grant.epoch,
        "role": grant.role,
        "liveness": grant.liveness,
        "instance_id": grant.instance_id,
        "backend": grant.backend,
        "backend_id": grant.backend_id,
        "holder_id": grant.holder_id,
        "kind": grant.kind,
    }


@lease_app.command("acquire")
def acquire(
    workspace: str = typer.Argument(..., help="Workspace id."),
    group: str = typer.Argument(..., help="Sandbox group id."),
    backend: str | None = typer.Option(None, "--backend", help="Backend for a new lease (default: local)."),
    kind: str = Kind,
    holder: str | None = typer.Option(None, "--holder", help="Holder id (default: a new uuid)."),
    subject: str | None = typer.Option(None, "--subject", help="Who the holder acts for."),
    expected_epoch: int | None = typer.Option(None, "--expected-epoch", help="Fail unless the lease is at this epoch."),
    agent: str | None = typer.Option(None, "--agent", help="Agent id of the machine (backend selfhosted)."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Hold a lease, creating its box if it is cold; waits until the box is warm."""
    settings = load_settings(data_dir)

    async def action(leases: LeaseClient) -> LeaseGrant:
        with progress(f"acquiring {workspace}/{group} (a cold lease creates its box first)"):
            return await leases.acquire(
                workspace,
                group,
                kind=_holder_kind(kind),
                holder_id=holder,
                subject=subject,
                expected_epoch=expected_epoch,
                backend=backend,
                agent_id=agent,
            )

    grant = with_leases(settings, action)
    if json_out:
        emit(_grant_json(grant), True)
    else:
        emit(
            f"{grant.liveness} epoch={grant.epoch} role={grant.role} box={grant.instance_id} "
            f"holder={grant.kind}:{grant.holder_id}",
            False,
        )
        emit(f"next: sandboxctl exec {workspace} {group} -- echo hello", False)


@lease_app.command("heartbeat")
def heartbeat(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    holder: str = typer.Option(..., "--holder", help="Holder id given at acquire."),
    kind: str = Kind,
    epoch: int | None = typer.Option(None, "--epoch", help="Epoch of your grant (default: the lease's current)."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Keep a holder alive; fails with StaleEpoch when the box was replaced."""
    settings = load_settings(data_dir)

    async def action(leases: LeaseClient) -> HeartbeatResult:
        current = epoch if epoch is not None else (await leases.describe(workspace, group)).epoch
        return await leases.heartbeat(workspace, group, holder, current, kind=_holder_kind(kind))

    result = with_leases(settings, action)
    emit(result if json_out else f"alive epoch={result.epoch} until {result.expires_at.isoformat()}", json_out)


@lease_app.command("release")
def release(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    holder: str = typer.Option(..., "--holder", help="Holder id given at acquire."),
    kind: str = Kind,
    epoch: int | None = typer.Option(None, "--epoch", help="Refuse unless the lease is still at this epoch."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Stop holding a lease; the last holder out starts the idle grace."""
    settings = load_settings(data_dir)

    async def action(leases: LeaseClient) -> ReleaseResult:
        if epoch is not None:
            current = (await leases.describe(workspace, group)).epoch
            if current != epoch:
                raise StaleEpoch(f"the lease is at epoch {current}, not {epoch}; your holder is already gone")
        return await leases.release(workspace, group, holder, kind=_holder_kind(kind))

    result = with_leases(settings, action)
    emit(
        result if json_out else f"released; lease {result.liveness}, {result.remaining_holders} holder(s) left",
        json_out,
    )


@lease_app.command("describe")
def describe(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show a lease: liveness, epoch, box, holders and recent transitions."""
    settings = load_settings(data_dir)
    view = with_leases(settings, lambda leases: leases.describe(workspace, group))
    if json_out:
        emit(view, True)
        return
    emit(
        {
            "lease": view.lease_id,
            "backend": view.backend,
            "liveness": view.liveness,
            "epoch": view.epoch,
            "box": view.instance_id,
            "holders": ", ".join(f"{h.kind}:{h.holder_id}" for h in view.holders) or "none",
            "hold": f"until {view.hold_until.isoformat()} ({view.hold_reason})" if view.hold_until else None,
            "last error": view.last_error,
        },
        False,
    )
    emit(
        [
            {
                "at": t.at.isoformat(timespec="seconds"),
                "from": t.from_liveness,
                "to": t.to_liveness,
                "epoch": t.epoch,
                "reason": t.reason,
            }
            for t in view.transitions
        ],
        False,
    )


@lease_app.command("capabilities")
def capabilities(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show the session's negotiated capabilities: each cell available or the reason it is not."""
    from activities.planes import runtime_desktop

    settings = load_settings(data_dir)

    async def negotiate(leases: LeaseClient) -> SessionCapabilities:
        view = await leases.describe(workspace, group)
        # The embedded stack's worker runs on this host, so this host decides what a local box can run.
        return await leases.capabilities(workspace, group, runtime_desktop=runtime_desktop(view.backend))

    doc = with_leases(settings, negotiate)
    if json_out:
        emit(doc.model_dump(mode="json", by_alias=True), True)
        return
    plain = doc.model_dump(mode="json", by_alias=True)
    rows = []
    for name, cell in plain.items():
        if isinstance(cell, dict) and ("available" in cell or "reason" in cell):
            available = cell.get("available", cell.get("reason") is None)
            rows.append({"capability": name, "available": available, "reason": cell.get("reason") or ""})
    emit(rows, False)


@lease_app.command("list")
def list_leases(
    liveness: str | None = typer.Option(
        None, "--liveness", help="Only leases in this state (cold/warming/warm/draining)."
    ),
    workspace: str | None = typer.Option(None, "--workspace", help="Only leases of this workspace."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """List leases from the store's projection (what the worker last wrote)."""
    if liveness is not None and liveness not in LIVENESS_VALUES:
        fail(f"--liveness must be one of {', '.join(LIVENESS_VALUES)}", EXIT_USAGE)
    settings = load_settings(data_dir)

    async def stored(db: Database) -> list[LeaseRecord]:
        return await LeaseRepository(db).list(liveness=liveness, workspace_id=workspace)

    records = with_store(settings, stored, read_only=True)
    rows = [
        {
            "workspace_id": r.workspace_id,
            "group_id": r.group_id,
            "backend": r.backend,
            "liveness": r.liveness,
            "epoch": r.epoch,
            "instance_id": r.instance_id,
            "holders": len(r.holders),
            "updated_at": r.updated_at.isoformat(timespec="seconds"),
        }
        for r in records
    ]
    if json_out:
        emit(rows, True)
    elif rows:
        emit(rows, False)
    else:
        emit("no leases" + (f" in state {liveness}" if liveness else ""), False)


@lease_app.command("drain")
def drain(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    wait: bool = typer.Option(False, "--wait", help="Return only once the lease is cold."),
    reason: str = typer.Option("operator", "--reason", help="Recorded in the lease's transitions."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Drop every holder and tear the box down now."""
    settings = load_settings(data_dir)

    async def action(leases: LeaseClient) -> LeaseView:
        with progress(f"draining {workspace}/{group}"):
            return await leases.drain(workspace, group, reason=reason, wait=wait)

    view = with_leases(settings, action)
    emit(view if json_out else f"{view.liveness} epoch={view.epoch}", json_out)


@lease_app.command("stop")
def stop(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Drain the box and complete the lease workflow."""
    settings = load_settings(data_dir)
    with_leases(settings, lambda leases: leases.stop(workspace, group))
    emit({"workspace": workspace, "group": group, "stop": "requested"} if json_out else "stop requested", json_out)


@lease_app.command("hold")
def hold(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    minutes: float = typer.Option(60.0, "--minutes", min=0.0, help="How long the hold lasts, in minutes."),
    reason: str = typer.Option("operator", "--reason", help="Recorded in the lease's transitions."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Hold the box: no automatic teardown (idle, TTL) until the hold ends or `lease unhold`."""
    settings = load_settings(data_dir)
    until = datetime.now(UTC) + timedelta(minutes=minutes)
    with_leases(settings, lambda leases: leases.hold_teardown(workspace, group, until=until, reason=reason))
    doc = {"workspace": workspace, "group": group, "held_until": until.isoformat(), "reason": reason}
    emit(doc if json_out else f"held until {until.isoformat()}", json_out)


@lease_app.command("unhold")
def unhold(
    workspace: str = typer.Argument(...),
    group: str = typer.Argument(...),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Lift an operator hold: the lease's idle and TTL timers apply again."""
    settings = load_settings(data_dir)
    with_leases(settings, lambda leases: leases.unhold(workspace, group))
    emit({"workspace": workspace, "group": group, "held_until": None} if json_out else "hold lifted", json_out)


async def _exec_rearming(
    leases: LeaseClient, workspace: str, group: str, cmd: list[str], workdir: str | None, timeout: float | None
) -> ExecOutcome:
    """Run ``cmd`` in the warm box; a lease in its idle grace is held (``direct``) meanwhile, as ``fs`` does.

    Without the hold the grace would run out during or right after the command and tear the box
    down under the caller; the release afterwards starts a fresh grace. A cold lease stays
    ``LeaseNotWarm`` (exec never creates a box).
    """
    try:
        view: LeaseView | None = await leases.describe(workspace, group)
    except SandboxError:
        view = None  # the exec itself reports it (LeaseNotWarm, ...)
    in_grace = (
        view is not None
        and view.liveness == "draining"
        and not view.holders
        and not view.stop_requested
        and view.drain_deadline is not None
        and view.drain_deadline > datetime.now(UTC)
    )
    if not in_grace:
        return await leases.exec(workspace, group, cmd, workdir=workdir, timeout_seconds=timeout)
    async with leases.hold(workspace, group, kind="direct"):
        return await leases.exec(workspace, group, cmd, workdir=workdir, timeout_seconds=timeout)


def exec_command(
    ctx: typer.Context,
    workspace: str = typer.Argument(..., help="Workspace id."),
    group: str = typer.Argument(..., help="Sandbox group id."),
    workdir: str | None = typer.Option(None, "--workdir", help="Directory in the box (default: the workspace)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds before the command is killed."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Run a command in the lease's warm box; prints its output and exits with its exit code."""
    cmd = list(ctx.args)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        fail("no command given: sandboxctl exec WORKSPACE GROUP -- CMD ...", EXIT_USAGE)
    settings = load_settings(data_dir)
    out = with_leases(settings, lambda leases: _exec_rearming(leases, workspace, group, cmd, workdir, timeout))
    if json_out:
        emit(out, True)
    else:
        sys.stdout.write(out.stdout)
        sys.stdout.flush()
        sys.stderr.write(out.stderr)
        sys.stderr.flush()
    raise typer.Exit(code=out.exit_code)
