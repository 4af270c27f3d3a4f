"""``sandboxctl agent run``, ``sandboxctl machine ...`` and ``sandboxctl session swap``: selfhosted machines.

``agent run`` is the daemon a user starts on their own machine; it serves the control ops over
NATS confined to ``--root``. ``machine enroll|list|revoke`` keep the workspace's ``enrollments``
(``list`` pings each agent and shows online / reconnecting / offline). ``session swap`` moves a
session's active pointer by compare-and-set on its epoch. Store commands find the data dir like the
other commands (``--data-dir``, ``SANDBOX_DATA_DIR`` or ``./.sandbox``) and take ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import typer

from cli.exits import EXIT_FENCED, EXIT_NOT_FOUND, EXIT_REFUSED, load_settings, refuse, with_store
from cli.output import emit, fail, note
from sandbox.errors import SandboxError, StaleEpoch
from sandbox.liveness import SelfhostedLiveness
from sandbox.routing import ActivePointer
from store.database import Database
from store.machines import EnrollmentRecord

agent_app = typer.Typer(help="Run the selfhosted agent on this machine.", no_args_is_help=True)
machine_app = typer.Typer(help="Enroll, list and revoke selfhosted machines.", no_args_is_help=True)
session_app = typer.Typer(help="Route a session between boxes.", no_args_is_help=True)

DataDir = typer.Option(None, "--data-dir", help="Data dir of the stack (default $SANDBOX_DATA_DIR or ./.sandbox).")
Json = typer.Option(False, "--json", help="Print one JSON document (for scripts).")


def register(app: typer.Typer) -> None:
    """Attach ``agent``, ``machine`` and ``session`` to the root app."""
    app.add_typer(agent_app, name="agent")
    app.add_typer(machine_app, name="machine")
    app.add_typer(session_app, name="session")


# --- agent run -------------------------------------------------------------------------------------


@agent_app.command("run")
def agent_run(
    credential_file: Path = typer.Option(
        ...,
        "--credential",
        envvar="SANDBOX_AGENT_CREDENTIAL",
        help="The credential `sandboxctl machine enroll` made for this machine (keep it 0600).",
    ),
    workspace: str | None = typer.Option(
        None, "--workspace", help="Workspace this machine serves (default: the credential's)."
    ),
    agent_id: str | None = typer.Option(
        None, "--agent-id", help="This machine's agent id (default: the credential's)."
    ),
    root: Path = typer.Option(Path("."), "--root", help="Directory the agent serves; nothing outside it is reachable."),
    nats: str | None = typer.Option(None, "--nats", help="NATS URL (default $SANDBOX_NATS_URL or the running stack)."),
    allow_exec: bool = typer.Option(True, "--exec/--no-exec", help="Let the runtime run commands and terminals."),
    allow_files: bool = typer.Option(True, "--files/--no-files", help="Let the runtime read and write under --root."),
    allow_screen_view: bool = typer.Option(
        True, "--screen-view/--no-screen-view", help="Let the runtime see the screen (screenshots, desktop stream)."
    ),
    allow_screen_control: bool = typer.Option(
        False, "--allow-screen-control", help="Let the runtime drive this machine's mouse and keyboard."
    ),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Where the fence epoch is kept."),
    max_concurrent_ops: int = typer.Option(64, "--max-concurrent-ops", min=1, help="Ops run at once before DRAINING."),
    drain_timeout: float = typer.Option(60.0, "--drain-timeout", min=0, help="Seconds running ops get on SIGTERM."),
    data_dir: Path | None = DataDir,
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON line once serving (workspace, agent, subject)."
    ),
) -> None:
    """Serve this machine to the runtime until SIGTERM (which drains: running ops finish, new ones wait)."""
    from daemons.agent import AgentConfig, AgentConsent, AgentDaemon
    from daemons.agent.daemon import default_state_dir, use_pidfd_child_watcher
    from sandbox.control_auth import AgentCredential
    from sandbox.nats_auth import NatsAuth

    settings = load_settings(data_dir)
    try:
        credential = AgentCredential.read(credential_file)
    except SandboxError as err:
        fail(err.message)
    workspace = workspace or credential.workspace_id
    agent_id = agent_id or credential.agent_id
    url = nats or credential.nats_url or settings.nats_url
    if not root.is_dir():
        fail(f"--root {root} is not a directory")
    if os.geteuid() == 0:
        note(
            "warning: running as root: every command the runtime sends runs as root on this machine; "
            "run the agent as an ordinary user that owns --root"
        )
    if settings.nats_auth == "off":
        note("SANDBOX_NATS_AUTH=off: connecting without a NATS identity (requests are still verified)")
    nats_auth = NatsAuth.for_agent(settings, credential)
    consent = AgentConsent(
        exec=allow_exec, files=allow_files, screen_view=allow_screen_view, screen_control=allow_screen_control
    )
    try:
        daemon = AgentDaemon(
            AgentConfig(
                workspace_id=workspace,
                agent_id=agent_id,
                root=root,
                credential=credential,
                nats_auth=nats_auth,
                nats_url=url,
                consent=consent,
                state_dir=state_dir or default_state_dir(),
                max_concurrent_ops=max_concurrent_ops,
                drain_timeout=drain_timeout,
            )
        )
    except SandboxError as err:
        fail(err.message)
    if json_out:
        serving = {"workspace": workspace, "agent": agent_id, "root": root.resolve(), "subject": daemon.subject}
        emit({"event": "serving", **serving, "nats_url": url, "allowed": list(consent.allowed())}, True)
    else:
        note(
            f"agent {workspace}/{agent_id} serving {root.resolve()} on {daemon.subject} via {url}"
            f" (allowed: {', '.join(consent.allowed()) or 'nothing'})"
        )
    use_pidfd_child_watcher()
    asyncio.run(daemon.run_until_signalled())
    note("agent stopped")


# --- machine ---------------------------------------------------------------------------------------


def _enrollment_json(
    record: EnrollmentRecord, liveness: SelfhostedLiveness | None = None, latency_ms: float | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "workspace": record.workspace_id,
        "agent": record.agent_id,
        "status": record.status,
        "exposure": record.exposure,
        "screen_control": record.allow_screen_control,
        "display": record.has_display,
        "hostname": record.hostname,
        "last_seen": record.last_seen_at,
    }
    if liveness is not None:
        out["liveness"] = liveness.state
    if latency_ms is not None:
        out["ping_ms"] = round(latency_ms, 1)
    return out


@machine_app.command("enroll")
def machine_enroll(
    workspace: str = typer.Argument(..., help="Workspace id."),
    agent_id: str = typer.Argument(..., help="Agent id the machine runs with (agent run --agent-id)."),
    exposure: str = typer.Option("workspace", "--exposure", help="workspace (its root) or whole-machine."),
    allow_screen_control: bool = typer.Option(False, "--allow-screen-control", help="Owner consents to desktop input."),
    display: bool = typer.Option(False, "--display/--no-display", help="The machine has a display."),
    credential_out: Path | None = typer.Option(
        None,
        "--credential-out",
        help="Write the machine's credential to this file (mode 0600) instead of printing it.",
    ),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Enroll a machine in a workspace and issue its credential, shown once (re-enrolling replaces it).

    The credential holds the machine's NATS identity and reply-signing key and the runtime's
    public key; the runtime keeps only the public halves. Re-enrolling lifts a revocation and
    issues a new credential (the old one stops working).
    """
    from cli.stack import sync_nats_users
    from sandbox.control_auth import ControlSigningKey
    from sandbox.control_protocol import validate_agent_token
    from store.machines import EnrollmentRepository, Exposure

    settings = load_settings(data_dir)
    try:
        validate_agent_token(workspace, "workspace id")
        validate_agent_token(agent_id, "agent id")
        signing_key = ControlSigningKey.load(settings.control_key_path())
    except SandboxError as err:
        refuse(err)
    credential = signing_key.issue_credential(workspace, agent_id, nats_url=settings.nats_url)

    if exposure not in ("workspace", "whole-machine"):
        fail(f"--exposure must be workspace or whole-machine, not {exposure!r}")
    exposure_kind: Exposure = "whole-machine" if exposure == "whole-machine" else "workspace"

    async def action(db: Database) -> EnrollmentRecord:
        record = await EnrollmentRepository(db).enroll(
            workspace,
            agent_id,
            exposure=exposure_kind,
            allow_screen_control=allow_screen_control,
            has_display=display,
            nats_public_key=credential.nats_public_key,
            reply_key_id=credential.reply_key_id,
        )
        await sync_nats_users(settings, db)
        return record

    if credential_out is not None:
        try:
            credential.write(credential_out)
        except OSError as err:
            fail(f"cannot write the credential to {credential_out}: {err.strerror}", EXIT_REFUSED)
    record = with_store(settings, action)
    secret_text = None if credential_out is not None else credential.to_file_bytes().decode()
    if json_out:
        out = _enrollment_json(record)
        out["credential_file"] = str(credential_out) if credential_out is not None else None
        if secret_text is not None:
            out["credential"] = json.loads(secret_text)
        emit(out, True)
    else:
        emit(f"enrolled {workspace}/{agent_id} ({record.exposure})", False)
        if secret_text is not None:
            note("the machine's credential follows; it is shown once: save it as a 0600 file on that machine")
            emit(secret_text.rstrip("\n"), False)
            where = "FILE"
        else:
            note(f"credential written to {credential_out} (mode 0600); move it to the machine")
            where = str(credential_out)
        note(f"next, on that machine: sandboxctl agent run --credential {where} --root DIR")


@machine_app.command("list")
def machine_list(
    workspace: str | None = typer.Argument(None, help="Only this workspace."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Ping each agent to tell online from offline."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """List enrolled machines with their liveness (online / reconnecting / offline)."""
    from providers.selfhosted import NatsControlRpc, probe_agent
    from sandbox.liveness import selfhosted_liveness
    from store.machines import EnrollmentRepository

    settings = load_settings(data_dir)

    async def action(db: Database) -> list[dict[str, Any]]:
        repo = EnrollmentRepository(db)
        records = await repo.list(workspace)
        rpc = NatsControlRpc.for_settings(settings)
        try:

            async def one(record: EnrollmentRecord) -> dict[str, Any]:
                if not probe or record.status != "active":
                    return _enrollment_json(record, selfhosted_liveness(record.view(), False))
                result = await probe_agent(
                    rpc, record.workspace_id, record.agent_id, timeout=settings.selfhosted_probe_timeout_seconds
                )
                if result.responded:
                    reply = result.reply
                    await repo.record_seen(
                        record.workspace_id,
                        record.agent_id,
                        hostname=reply.hostname if reply else None,
                        os=reply.os if reply else None,
                        has_display=reply.has_display if reply else None,
                    )
                    record = await repo.get(record.workspace_id, record.agent_id) or record
                return _enrollment_json(record, selfhosted_liveness(record.view(), result.responded), result.latency_ms)

            return list(await asyncio.gather(*(one(r) for r in records)))
        finally:
            await rpc.close()

    rows = with_store(settings, action, read_only=True)
    if json_out:
        emit(rows, True)
    elif rows:
        emit(rows, False)
    else:
        emit("no machines enrolled; enroll one with: sandboxctl machine enroll WORKSPACE AGENT_ID", False)


@machine_app.command("revoke")
def machine_revoke(
    workspace: str = typer.Argument(..., help="Workspace id."),
    agent_id: str = typer.Argument(..., help="Agent id."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Revoke a machine: it reads as offline and no session is routed to it any more."""
    from cli.stack import sync_nats_users
    from store.machines import EnrollmentRepository

    settings = load_settings(data_dir)

    async def action(db: Database) -> bool:
        revoked = await EnrollmentRepository(db).revoke(workspace, agent_id)
        if revoked:
            # The server drops the machine's NATS identity now: its connection closes, NATS keeps running.
            await sync_nats_users(settings, db)
        return revoked

    revoked = with_store(settings, action)
    if not revoked:
        fail(f"{workspace}/{agent_id} is not enrolled", EXIT_NOT_FOUND)
    emit(
        {"workspace": workspace, "agent": agent_id, "status": "revoked"}
        if json_out
        else f"revoked {workspace}/{agent_id}",
        json_out,
    )


# --- session ---------------------------------------------------------------------------------------


def _pointer_json(session_id: str, pointer: ActivePointer) -> dict[str, Any]:
    return {
        "session": session_id,
        "active_sandbox_id": pointer.active_sandbox_id,
        "active_epoch": pointer.active_epoch,
        "working_dir": pointer.working_dir,
    }


@session_app.command("swap")
def session_swap(
    session_id: str = typer.Argument(..., help="Session id."),
    to: str = typer.Option(..., "--to", help="Target: selfhosted:<agent_id>, lease:<group_id>, or home."),
    expected_epoch: int | None = typer.Option(
        None, "--expected-epoch", min=0, help="Refuse unless the pointer is at this epoch (default: its current one)."
    ),
    working_dir: str | None = typer.Option(None, "--working-dir", help="Working dir on the new target."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Point a session at another box: compare-and-set on the pointer's epoch (a racing swap loses)."""
    from sandbox.routing import parse_sandbox_id
    from store.machines import SessionPointerRepository

    target: str | None = None if to == "home" else to
    if target is not None:
        try:
            parse_sandbox_id(target)
        except SandboxError as err:
            fail(err.message)
    settings = load_settings(data_dir)

    async def action(db: Database) -> ActivePointer:
        repo = SessionPointerRepository(db)
        expected = expected_epoch if expected_epoch is not None else (await repo.get(session_id)).active_epoch
        return await repo.swap(session_id, target, expected_epoch=expected, working_dir=working_dir)

    try:
        pointer = with_store(settings, action)
    except StaleEpoch as err:  # pragma: no cover - _with_store already turns it into an exit
        fail(err.message, EXIT_FENCED)
    emit(
        _pointer_json(session_id, pointer)
        if json_out
        else f"session {session_id} -> {pointer.active_sandbox_id or 'home'} at epoch {pointer.active_epoch}",
        json_out,
    )


@session_app.command("show")
def session_show(
    session_id: str = typer.Argument(..., help="Session id."),
    data_dir: Path | None = DataDir,
    json_out: bool = Json,
) -> None:
    """Show where a session's ops go right now."""
    from store.machines import SessionPointerRepository

    settings = load_settings(data_dir)
    pointer = with_store(settings, lambda db: SessionPointerRepository(db).get(session_id), read_only=True)
    emit(_pointer_json(session_id, pointer), json_out)
